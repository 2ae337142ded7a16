// The coordinator's gRPC edge: JobService (clients, viewers) and WorkerService (worker groups)
// over the Scheduler, a role check on every RPC (coordinator/auth.h), TLS when configured, and
// request validation (INVALID_ARGUMENT naming the field and the value). Plus `Coordinator`, which wires
// the store, the metrics, the scheduler and the server together for main() and tests.
//
// Thread-safe: the services are stateless over the (thread-safe) scheduler and authenticator.
#ifndef AVIARY_COORDINATOR_SERVICE_H_
#define AVIARY_COORDINATOR_SERVICE_H_

#include <chrono>
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/logging.h"
#include "coordinator/auth.h"
#include "coordinator/console.h"
#include "coordinator/coordinator_config.h"
#include "coordinator/metrics.h"
#include "coordinator/scheduler.h"
#include "coordinator/store.h"
#include "proto/aviary.grpc.pb.h"

namespace grpc {
class Server;
}

namespace aviary::coordinator {

// The absl::Status as a grpc::Status (same code, same message).
grpc::Status ToGrpcStatus(const absl::Status& status);

class JobServiceImpl final : public aviary::v1::JobService::Service {
 public:
  // `auth` outlives the service.
  JobServiceImpl(Scheduler* scheduler, const Authenticator* auth) : scheduler_(scheduler), auth_(auth) {}

  grpc::Status SubmitJob(grpc::ServerContext* context, const aviary::v1::SubmitJobRequest* request,
                         aviary::v1::SubmitJobResponse* response) override;
  grpc::Status GetJob(grpc::ServerContext* context, const aviary::v1::GetJobRequest* request,
                      aviary::v1::JobInfo* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context, const aviary::v1::ListJobsRequest* request,
                        aviary::v1::ListJobsResponse* response) override;
  grpc::Status CancelJob(grpc::ServerContext* context, const aviary::v1::CancelJobRequest* request,
                         aviary::v1::CancelJobResponse* response) override;
  grpc::Status WatchJob(grpc::ServerContext* context, const aviary::v1::WatchJobRequest* request,
                        grpc::ServerWriter<aviary::v1::JobEvent>* writer) override;
  grpc::Status GetHistory(grpc::ServerContext* context, const aviary::v1::GetHistoryRequest* request,
                          aviary::v1::GetHistoryResponse* response) override;
  grpc::Status PruneJobs(grpc::ServerContext* context, const aviary::v1::PruneJobsRequest* request,
                         aviary::v1::PruneJobsResponse* response) override;
  grpc::Status ListGroups(grpc::ServerContext* context, const aviary::v1::ListGroupsRequest* request,
                          aviary::v1::ListGroupsResponse* response) override;
  grpc::Status GetLogs(grpc::ServerContext* context, const aviary::v1::GetLogsRequest* request,
                       aviary::v1::GetLogsResponse* response) override;
  grpc::Status RetryJob(grpc::ServerContext* context, const aviary::v1::RetryJobRequest* request,
                        aviary::v1::JobInfo* response) override;
  grpc::Status DeleteJob(grpc::ServerContext* context, const aviary::v1::DeleteJobRequest* request,
                         aviary::v1::DeleteJobResponse* response) override;

 private:
  Scheduler* scheduler_;
  const Authenticator* auth_;
  std::atomic<int> watchers_{0};         // open WatchJob streams
  std::atomic<int> viewer_watchers_{0};  // those of them opened with a viewer token
};

class WorkerServiceImpl final : public aviary::v1::WorkerService::Service {
 public:
  // `auth` outlives the service.
  WorkerServiceImpl(Scheduler* scheduler, const Authenticator* auth) : scheduler_(scheduler), auth_(auth) {}

  grpc::Status RegisterGroup(grpc::ServerContext* context,
                             const aviary::v1::RegisterGroupRequest* request,
                             aviary::v1::RegisterGroupResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context, const aviary::v1::HeartbeatRequest* request,
                         aviary::v1::HeartbeatResponse* response) override;
  grpc::Status LeaseTask(grpc::ServerContext* context, const aviary::v1::LeaseTaskRequest* request,
                         aviary::v1::LeaseTaskResponse* response) override;
  grpc::Status ReportProgress(grpc::ServerContext* context,
                              const aviary::v1::ReportProgressRequest* request,
                              aviary::v1::ReportProgressResponse* response) override;
  grpc::Status ReportCheckpoint(grpc::ServerContext* context,
                                const aviary::v1::ReportCheckpointRequest* request,
                                aviary::v1::ReportCheckpointResponse* response) override;
  grpc::Status CompleteTask(grpc::ServerContext* context,
                            const aviary::v1::CompleteTaskRequest* request,
                            aviary::v1::CompleteTaskResponse* response) override;
  grpc::Status FailTask(grpc::ServerContext* context, const aviary::v1::FailTaskRequest* request,
                        aviary::v1::FailTaskResponse* response) override;
  grpc::Status LeaveGroup(grpc::ServerContext* context, const aviary::v1::LeaveGroupRequest* request,
                          aviary::v1::LeaveGroupResponse* response) override;
  grpc::Status GetManifest(grpc::ServerContext* context, const aviary::v1::GetManifestRequest* request,
                           grpc::ServerWriter<aviary::v1::ManifestChunk>* writer) override;
  grpc::Status ShipLogs(grpc::ServerContext* context, const aviary::v1::ShipLogsRequest* request,
                        aviary::v1::ShipLogsResponse* response) override;

 private:
  Scheduler* scheduler_;
  const Authenticator* auth_;
};

// What the coordinator reads from the files its config names: the tokens and the TLS PEMs.
struct CoordinatorSecrets {
  TokenSet tokens;  // empty only with allow_no_auth and no token files
  std::string tls_cert_pem;
  std::string tls_key_pem;
  std::string tls_client_ca_pem;  // "" = no client certificates requested
};

// Reads the token files (LoadTokenSet) and tls_cert_file / tls_key_file / tls_client_ca_file;
// errors name the key and the file: one that does not read, is not PEM, or a key that does not
// fit the certificate (CheckTlsPem).
absl::StatusOr<CoordinatorSecrets> LoadCoordinatorSecrets(const CoordinatorConfig& config);

// A running coordinator: store, metrics, scheduler (with its reaper) and the gRPC server.
class Coordinator {
 public:
  // Opens the store, restores the scheduler, serves /metrics, gRPC and (console_listen) the web
  // console, then writes the port files. Logs "listening on HOST:PORT (gRPC), metrics on
  // HOST:PORT" and "console on http(s)://HOST:PORT/".
  static absl::StatusOr<std::unique_ptr<Coordinator>> Start(const CoordinatorConfig& config,
                                                            const CoordinatorSecrets& secrets);
  ~Coordinator();

  // Removes the port files it wrote (those that still name its ports), stops accepting calls,
  // waits up to `grace` for running ones (then cancels them), stops the scheduler and closes the
  // store. Idempotent.
  absl::Status Shutdown(std::chrono::milliseconds grace = std::chrono::milliseconds(5000));

  // Re-reads the config's token files (SIGHUP) and swaps them in as a whole; logs "tokens
  // reloaded: N client, M viewer, K worker". On an error (naming the key and the file) the
  // current tokens stay. Not to be called concurrently with Shutdown.
  absl::Status ReloadTokens();

  // `on_broken` is called once when the database can take no more writes (a COMMIT that failed
  // in its I/O; Store::SetOnBroken): every write RPC fails from then on, and only a restart
  // mends it. From any thread, under the store's lock: it must only hand the news on (main asks
  // the process to exit 1). At once when broken already.
  void OnStoreBroken(std::function<void(const absl::Status&)> on_broken);

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_ ? metrics_->port() : 0; }
  // The web console's port, 0 when console_listen is "".
  int console_port() const { return console_ ? console_->port() : 0; }
  Scheduler* scheduler() { return scheduler_.get(); }
  CoordinatorMetrics* metrics() { return metrics_.get(); }

 private:
  Coordinator() = default;
  void RemovePortFiles();

  common::Logger log_{"coordinator"};
  std::unique_ptr<Store> store_;
  std::unique_ptr<CoordinatorMetrics> metrics_;
  std::unique_ptr<Scheduler> scheduler_;
  CoordinatorConfig config_;
  std::unique_ptr<Authenticator> auth_;
  std::unique_ptr<JobServiceImpl> job_service_;
  std::unique_ptr<WorkerServiceImpl> worker_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Console> console_;
  int grpc_port_ = 0;
  // The port files written at the start: (path, contents).
  std::vector<std::pair<std::string, std::string>> port_files_;
  bool shut_down_ = false;
};

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_SERVICE_H_
