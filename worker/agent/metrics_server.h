// A worker group's /metrics endpoint: a minimal HTTP/1.1 server for Prometheus' text format.
//
// GET (or HEAD) /metrics, or /, answers the collectable's samples at that moment
// (text/plain; version=0.0.4); another path is 404, another method 405. One thread serves up to
// 32 connections side by side (poll) and closes each after its answer (Prometheus scrapes every
// few seconds); a request must arrive within 5 s of the connection and may not exceed 16 KB,
// and its answer must be taken within 5 s more. An accept that fails for want of descriptors
// is said once and tried again every 250 ms.
//
// Why not prometheus-cpp's Exposer (which the coordinator uses): Debian's civetweb starts its
// threads with a 100 KB stack, and glibc places a thread's static TLS on its stack. A CUDA
// libtorch loads cuBLASLt, whose static TLS alone is 92 KB: pthread_create fails with EINVAL
// and the Exposer refuses to start ("null context when constructing CivetServer"). This
// server's thread has the default stack.
//
// Thread-safe: Start, port and the destructor from any one thread; the collectable must be
// thread-safe (prometheus::Registry is).
#ifndef AVIARY_WORKER_AGENT_METRICS_SERVER_H_
#define AVIARY_WORKER_AGENT_METRICS_SERVER_H_

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include <prometheus/collectable.h>

#include "absl/status/statusor.h"

namespace aviary::worker {

class MetricsServer {
 public:
  // Binds HOST:PORT (PORT 0 picks a free one; HOST may be a name, an IPv4 address, or an IPv6
  // address in brackets; 0.0.0.0 / [::] for every interface) and starts serving `collectable`.
  // INVALID_ARGUMENT naming `listen` when it is malformed or cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& listen, std::shared_ptr<prometheus::Collectable> collectable);
  ~MetricsServer();  // stops serving and joins the thread
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  int port() const { return port_; }

 private:
  MetricsServer(int listen_fd, int wake_read, int wake_write, int port,
                std::shared_ptr<prometheus::Collectable> collectable);
  struct Connection;
  void Serve();
  bool Step(Connection* c, short revents, std::chrono::steady_clock::time_point now) const;
  std::string Answer(const std::string& request) const;

  const int listen_fd_;
  const int wake_read_, wake_write_;  // a pipe that wakes the thread at shutdown
  const int port_;
  const std::shared_ptr<prometheus::Collectable> collectable_;
  std::thread thread_;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_METRICS_SERVER_H_
