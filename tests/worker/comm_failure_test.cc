// After a collective times out, the MPI backend does not wait again: the reducer's other
// buckets (waited on from destructors) and later collectives fail at once, naming the first
// failure, so the error reaches the coordinator without comm.timeout_s more per bucket.
// First: a LongerTimeout scope lets a late rank in without a failure.
// Under mpirun -np 2: rank 1 builds the reducer, then takes no part (it waits at a barrier on
// MPI_COMM_WORLD that rank 0 reaches at the end).
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "worker/comm/mpi_communicator.h"
#include "worker/comm/mpi_session.h"
#include "worker/comm/reducer.h"

namespace {

int failures = 0;

void Expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

}  // namespace

int main() {
  using namespace aviary::worker::comm;  // NOLINT
  auto session = MpiSession::Create();
  if (!session.ok()) {
    std::fprintf(stderr, "%s\n", std::string(session.status().message()).c_str());
    return 1;
  }
  if ((*session)->world_size() != 2) {
    std::fprintf(stderr, "run it under mpirun -np 2\n");
    return 1;
  }
  auto comm = MpiCommunicator::Create(/*timeout_s=*/1.0);
  if (!comm.ok()) return 1;
  {
    // Within a LongerTimeout scope a rank that comes later than comm.timeout_s (rank 0's slow
    // checkpoint writes, for the others) is no failure; the deadline comes back after it.
    if ((*comm)->rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    {
      Communicator::LongerTimeout longer(comm->get(), 10.0, "the test's slow rank");
      Expect((*comm)->timeout_s() == 10.0, "the deadline is raised");
      at::Tensor x = at::ones({4});
      const absl::Status st = (*comm)->AllReduce(x);
      Expect(st.ok(), "a late rank within the longer deadline: " + st.ToString());
      Expect(x[0].item<float>() == 2.0f, "the all-reduce's sum");
    }
    Expect((*comm)->timeout_s() == 1.0, "the deadline is back to comm.timeout_s");
  }
  std::vector<at::Tensor> params;
  for (int i = 0; i < 3; ++i) params.push_back(at::ones({1000}).set_requires_grad(true));
  ReducerOptions options;
  options.bucket_bytes = 4000;  // one parameter a bucket: three buckets
  options.first_bucket_bytes = 4000;
  {
    auto reducer = Reducer::Create(params, comm->get(), options);  // both ranks (it compares them)
    Expect(reducer.ok(), "Reducer::Create");
    if ((*comm)->rank() == 1) {
      MPI_Barrier(MPI_COMM_WORLD);
      return failures == 0 ? 0 : 1;  // its own checks above count too
    }
    if (reducer.ok()) {
      Expect((*reducer)->buckets().size() == 3, "three buckets");
      (*reducer)->Prepare();
      (params[0].sum() + params[1].sum() + params[2].sum()).backward();
      absl::Status finished = (*reducer)->Finish();
      Expect(absl::IsDeadlineExceeded(finished), "Finish times out: " + finished.ToString());
      Expect(finished.message().find("ranks that did not arrive: 1") != std::string::npos,
             "the timeout names rank 1: " + std::string(finished.message()));
      const auto t0 = std::chrono::steady_clock::now();
      reducer->reset();  // the other buckets' works: no second wait
      std::fprintf(stderr, "destroying the reducer after the timeout took %.3f s\n",
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  at::Tensor t = at::ones({4});
  absl::Status later = (*comm)->AllReduce(t);
  Expect(absl::IsAborted(later), "a later all-reduce is refused: " + later.ToString());
  Expect(later.message().find("an earlier one failed") != std::string::npos &&
             later.message().find("waited longer than comm.timeout_s") != std::string::npos,
         "the refusal names the first failure: " + std::string(later.message()));
  absl::Status barrier = (*comm)->Barrier();
  Expect(absl::IsAborted(barrier), "a later barrier is refused: " + barrier.ToString());
  MPI_Barrier(MPI_COMM_WORLD);
  std::fprintf(stderr, "comm_failure_test: %d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
