#include "worker/comm/communicator.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/mpi_session.h"
#ifdef AVIARY_WITH_NCCL_BACKEND
#include <c10/cuda/CUDAFunctions.h>

#include "worker/comm/nccl_communicator.h"
#endif

namespace aviary::worker::comm {

namespace {

// This rank's backend: "mpi" or "nccl", or why it has none.
absl::StatusOr<std::string> ChooseBackend(const common::CommConfig& config, const MpiSession& session,
                                          const at::Device& device) {
  std::string backend = config.backend;
  if (backend != "auto" && backend != "mpi" && backend != "nccl") {
    return absl::InvalidArgumentError(
        absl::StrCat("comm.backend: expected auto, nccl or mpi, got '", backend, "'"));
  }
  if (backend == "auto") {
    backend = "mpi";
#ifdef AVIARY_WITH_NCCL_BACKEND
    // NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): MPI then.
    if (device.is_cuda() && session.local_size() <= c10::cuda::device_count()) {
      backend = "nccl";
    } else if (device.is_cuda() && session.local_rank() == 0) {
      // Said once a host: a launcher that gives each rank one GPU of its own (CUDA_VISIBLE_DEVICES
      // per rank, srun --gpus-per-task=1) shows every rank one device, and the group went on with
      // MPI's host-memory all-reduce without a word.
      static const common::Logger log("comm");
      log.Warn(absl::StrCat("comm.backend auto: ", session.local_size(), " ranks on this host see ",
                            c10::cuda::device_count(), " GPU(s), so NCCL is not used (two ranks on one GPU "
                            "are refused by it); if each rank has a GPU of its own (CUDA_VISIBLE_DEVICES per "
                            "rank), set comm.backend: nccl"));
    }
#endif
  }
  if (backend == "nccl") {
#ifdef AVIARY_WITH_NCCL_BACKEND
    if (!device.is_cuda()) {
      return absl::FailedPreconditionError(
          "comm.backend: nccl needs a CUDA device; this rank trains on the CPU (use mpi)");
    }
#else
    return absl::FailedPreconditionError(
        "comm.backend: nccl is not built into this aviary-worker (it needs NCCL and a CUDA-enabled "
        "libtorch at build time); use comm.backend: mpi or auto");
#endif
  }
  return backend;
}

}  // namespace

namespace {

// AVIARY_FAULT_INJECT="rank=R,kind=fail_comm" (tests only): rank R's communicator is made and
// then refused, as an NCCL init that failed on that rank alone.
bool FailInjected(int rank) {
  const char* env = std::getenv("AVIARY_FAULT_INJECT");
  if (env == nullptr) return false;
  bool kind = false;
  int at = -1;
  for (absl::string_view part : absl::StrSplit(env, ',')) {
    if (part == "kind=fail_comm") kind = true;
    if (absl::ConsumePrefix(&part, "rank=") && !absl::SimpleAtoi(part, &at)) at = -1;
  }
  return kind && at == rank;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(const common::CommConfig& config,
                                                                 const MpiSession& session,
                                                                 const at::Device& device) {
  // Each rank chooses from its own host (its GPUs, its local ranks), but NCCL's and MPI's set-up
  // calls do not match: ranks that chose differently would wait in them for ever. So the ranks
  // agree first: an error anywhere ends every rank, and "auto" falls back to MPI everywhere when
  // one rank cannot use NCCL (more ranks than GPUs on a node; a rank without a GPU among GPU
  // ranks is refused after this, by the trainer and by `serve` at its start).
  // The set-up's collectives (the ranks' agreement, MPI_Comm_dup, the NCCL id's broadcast,
  // ncclCommInitRank) have no deadline of their own (comm.timeout_s, at least the minimum: the
  // ranks of `train` reach it after loading libtorch and their config, seconds apart on a loaded
  // host, and a low comm.timeout_s is for hung collectives).
  SetupDeadline deadline(std::max(config.timeout_s, MinSetupSeconds()), session.rank(), session.world_size(),
                         "the communicator's set-up",
                         absl::StrCat("max(comm.timeout_s, ", MinSetupSeconds(), " s)"));
  absl::StatusOr<std::string> mine = ChooseBackend(config, session, device);
  int first_failed = -1;
  AVIARY_RETURN_IF_ERROR(session.AllRanksOk(mine.status(), &first_failed));
  std::string backend = *mine;
  if (session.world_size() > 1) {
    const int nccl = backend == "nccl" ? 1 : 0;
    int all_nccl = 0;
    AVIARY_MPI_CHECK(MPI_Allreduce(&nccl, &all_nccl, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (backend == "nccl" && all_nccl == 0) {
      // Only "auto" gets here (an explicit nccl on a rank without CUDA failed above).
      static const common::Logger log("comm");
      log.Warn("comm.backend auto: another rank cannot use NCCL (no GPU of its own, or fewer GPUs than ranks on "
               "its host); the group all-reduces with MPI");
      backend = "mpi";
    }
  }
  absl::StatusOr<std::unique_ptr<Communicator>> made = absl::InternalError("no backend");
  try {  // (torch's device guard and stream pool throw): every rank must reach the agreement below
#ifdef AVIARY_WITH_NCCL_BACKEND
    if (backend == "nccl") {
      auto c = NcclCommunicator::Create(session, device, config.timeout_s);
      if (c.ok()) {
        made = std::unique_ptr<Communicator>(std::move(*c));
      } else {
        made = c.status();
      }
    }
#endif
    if (backend != "nccl") {
      auto c = MpiCommunicator::Create(config.timeout_s);
      if (c.ok()) {
        made = std::unique_ptr<Communicator>(std::move(*c));
      } else {
        made = c.status();
      }
    }
  } catch (const std::exception& e) {
    made = absl::InternalError(absl::StrCat("rank ", session.rank(), ": making the ", backend,
                                            " communicator: exception: ", e.what()));
  }
  if (made.ok() && FailInjected(session.rank())) {
    (*made)->Discard();
    made = absl::InternalError(absl::StrCat("AVIARY_FAULT_INJECT: rank ", session.rank(),
                                            " could not make its communicator (an NCCL init failing there alone)"));
  }
  // NCCL's init can fail on one rank only (connecting lazily, out of memory on a shared GPU):
  // the others went on into the trainer's first collective and waited there for the 30 minutes
  // of its longer deadline while the failing rank's error never reached the coordinator. Agreed
  // here: every rank fails with the first failing rank's error (the same code on every rank, so
  // that `serve` fails the task rather than ending the group); a made communicator is discarded.
  absl::Status everyone = session.FirstFailure(made.status());
  if (!everyone.ok()) {
    if (made.ok()) (*made)->Discard();
    return everyone;
  }
  return made;
}

absl::StatusOr<at::Tensor> AllGatherRows(Communicator& comm, const at::Tensor& rows) {
  if (rows.dim() < 1)
    return absl::InvalidArgumentError("AllGatherRows: needs at least one dimension");
  at::Tensor count = at::tensor({rows.size(0)}, at::kLong).to(rows.device());
  auto counts = comm.AllGather(count);
  if (!counts.ok()) return counts.status();
  at::Tensor c = counts->cpu();
  const int64_t max_rows = c.max().item<int64_t>();
  std::vector<int64_t> shape = rows.sizes().vec();
  shape[0] = max_rows;
  at::Tensor padded = at::zeros(shape, rows.options());
  if (rows.size(0) > 0) padded.narrow(0, 0, rows.size(0)).copy_(rows);
  auto gathered = comm.AllGather(padded);
  if (!gathered.ok()) return gathered.status();
  std::vector<at::Tensor> parts;
  for (int r = 0; r < comm.world_size(); ++r) {
    parts.push_back(gathered->narrow(0, r * max_rows, c[r].item<int64_t>()));
  }
  return at::cat(parts, 0);
}

absl::StatusOr<RootOutcome> ShareRootOutcome(Communicator& comm, const absl::Status& mine) {
  // The largest code wins: the others pass OK (0). One tensor, one collective.
  at::Tensor v = at::tensor({static_cast<int64_t>(mine.code()), common::IsLeaseRevoked(mine) ? int64_t{1} : 0}, at::kLong);
  AVIARY_RETURN_IF_ERROR(comm.AllReduce(v, ReduceOp::kMax));
  RootOutcome root;
  root.code = static_cast<absl::StatusCode>(v[0].item<int64_t>());
  root.lease_revoked = root.code != absl::StatusCode::kOk && v[1].item<int64_t>() != 0;
  return root;
}

std::string Communicator::TimeoutText() const {
  if (timeout_why_.empty()) return absl::StrCat("comm.timeout_s = ", timeout_s_, " s");
  return absl::StrCat(timeout_s_, " s (", timeout_why_, ")");
}

}  // namespace aviary::worker::comm
