// The worker group's control collectives (worker/agent/group_control) on real ranks: run under
// `mpirun -np 2 --oversubscribe` by ctest (one process skips what needs two). Broadcasts from
// either root of any size, the ranks out of step at an exchange, and a rank that does not arrive.
#include "worker/agent/group_control.h"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "worker/comm/mpi_session.h"

namespace aviary::worker {
namespace {

GroupControl* g_control = nullptr;

TEST(GroupControlMpiTest, BroadcastsFromEitherRootOfAnySize) {
  GroupControl& c = *g_control;
  for (int root = 0; root < c.world(); ++root) {
    for (size_t size : {size_t{0}, size_t{1}, size_t{100} << 10}) {
      std::string want(size, '\0');
      for (size_t i = 0; i < size; ++i) want[i] = static_cast<char>('a' + (i * 7 + root) % 26);
      std::string bytes = c.rank() == root ? want : std::string("left over from before");
      ASSERT_TRUE(c.Broadcast(&bytes, root, 0.001, 30).ok()) << "root " << root << " size " << size;
      EXPECT_EQ(bytes, want) << "root " << root << " size " << size;
    }
  }
}

TEST(GroupControlMpiTest, RanksAtDifferentExchangesAreAbortedNamingEach) {
  GroupControl& c = *g_control;
  if (c.world() < 2) GTEST_SKIP() << "needs two ranks";
  const int64_t kind = c.rank() == 0 ? kExStep : kExEpochEnd;
  auto rows = c.Exchange(kind, 1, 2, 3, 30, c.rank() == 1 ? absl::InternalError("out of memory") : absl::OkStatus());
  ASSERT_FALSE(rows.ok());
  EXPECT_EQ(rows.status().code(), absl::StatusCode::kAborted) << rows.status();
  EXPECT_TRUE(absl::StrContains(rows.status().message(), "rank 0 training (step exchange)")) << rows.status();
  EXPECT_TRUE(absl::StrContains(rows.status().message(), "rank 1 training (epoch end)")) << rows.status();
  if (c.rank() == 1) {
    EXPECT_TRUE(absl::StrContains(rows.status().message(), "(its error: out of memory)")) << rows.status();
  }
  // The same kinds agree again.
  auto agreed = c.Exchange(kExEpochEnd, c.rank(), 0, 0, 30, absl::OkStatus());
  ASSERT_TRUE(agreed.ok()) << agreed.status();
  EXPECT_EQ((*agreed)[kExchangeRow * 1 + 1], 1);
}

// A rank that does not arrive within the deadline: the others end with DEADLINE_EXCEEDED naming
// what they waited for; the late one completes once it arrives (the pending collective matches).
// Rank 1 arrives only when rank 0 has given up (rank 0 tells it), whatever the timing.
TEST(GroupControlMpiTest, ARankThatDoesNotArriveEndsTheWaitAtTheDeadline) {
  GroupControl& c = *g_control;
  if (c.world() != 2) GTEST_SKIP() << "needs two ranks exactly";
  int gave_up = 0;
  if (c.rank() == 0) {
    auto rows = c.AllGather({c.rank()}, 0.005, 0.5);
    EXPECT_EQ(rows.status().code(), absl::StatusCode::kDeadlineExceeded) << rows.status();
    EXPECT_TRUE(absl::StrContains(rows.status().message(), "rank 0 waited 0.5 s for the control all-gather"))
        << rows.status();
    gave_up = 1;
    ASSERT_EQ(MPI_Send(&gave_up, 1, MPI_INT, 1, 7, MPI_COMM_WORLD), MPI_SUCCESS);
  } else if (c.rank() == 1) {
    ASSERT_EQ(MPI_Recv(&gave_up, 1, MPI_INT, 0, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE), MPI_SUCCESS);
    auto rows = c.AllGather({c.rank()}, 0.005, 30);
    EXPECT_TRUE(rows.ok()) << rows.status();
  }
  MPI_Barrier(MPI_COMM_WORLD);  // rank 0's MPI progress completes the pending collective
}

}  // namespace
}  // namespace aviary::worker

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto session = aviary::worker::comm::MpiSession::Create();
  if (!session.ok()) {
    std::fprintf(stderr, "%s\n", std::string(session.status().message()).c_str());
    return 1;
  }
  int rc = 0;
  {
    auto control = aviary::worker::GroupControl::Create();
    if (!control.ok()) {
      std::fprintf(stderr, "%s\n", std::string(control.status().message()).c_str());
      return 1;
    }
    aviary::worker::g_control = control->get();
    rc = RUN_ALL_TESTS();
    // Every rank exits with the group's verdict.
    int failed = rc != 0 ? 1 : 0, any = 0;
    if (MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD) != MPI_SUCCESS || any != 0) rc = 1;
  }
  return rc;
}
