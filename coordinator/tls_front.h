// HTTPS in front of a plain HTTP server on loopback: accepts TLS connections (OpenSSL) on one
// address and relays each, decrypted, to 127.0.0.1:backend_port. The web console uses it
// because Debian 12's civetweb 1.15 crashes on its first TLS connection (a null OpenSSL 3
// function in its dlopen table; Debian's own `civetweb` binary does the same), so civetweb
// serves plain HTTP on an ephemeral loopback port and this serves the configured address.
//
// One thread accepts; each connection gets a thread (TLS handshake, then a poll loop relaying
// both ways) until either side closes. At most kMaxConnections at once (more are closed at
// once). The whole handshake must finish within handshake_timeout_ms (a client trickling a byte
// now and then is cut off then), and a write to a client that does not read gives up after 10 s
// without progress. Out of file descriptors, accepting pauses 200 ms between tries (and says
// so once). The client socket is non-blocking and every wait polls at most 200 ms, so
// Stop() (or the destructor) ends every connection within about 200 ms. Thread-safe.
#ifndef AVIARY_COORDINATOR_TLS_FRONT_H_
#define AVIARY_COORDINATOR_TLS_FRONT_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/logging.h"

typedef struct ssl_ctx_st SSL_CTX;

namespace aviary::coordinator {

// Whether the PEM texts load as TlsFront::Start (and gRPC) would use them: a certificate (chain),
// a private key, and a key that fits the certificate. INVALID_ARGUMENT starting with `cert_name`
// or `key_name` otherwise. Thread-safe.
absl::Status CheckTlsPem(const std::string& cert_pem, const std::string& key_pem, const std::string& cert_name,
                         const std::string& key_name);

// Whether `ca_pem` is one or more PEM certificates that parse (tls_client_ca_file, which gRPC
// would otherwise refuse only when it starts serving). INVALID_ARGUMENT starting with `name`.
absl::Status CheckTlsCaPem(const std::string& ca_pem, const std::string& name);

class TlsFront {
 public:
  static constexpr int kMaxConnections = 128;
  static constexpr int kHandshakeTimeoutMs = 10000;

  // Listens on `listen` (IPv4 HOST:PORT, port 0 picks one) with the PEM certificate chain and
  // key. INVALID_ARGUMENT when they do not load, UNAVAILABLE when the address cannot be bound.
  // `handshake_timeout_ms` (> 0; tests shorten it) bounds each connection's whole handshake.
  static absl::StatusOr<std::unique_ptr<TlsFront>> Start(const std::string& listen, int backend_port,
                                                         const std::string& cert_pem, const std::string& key_pem,
                                                         int handshake_timeout_ms = kHandshakeTimeoutMs);
  ~TlsFront();
  TlsFront(const TlsFront&) = delete;
  TlsFront& operator=(const TlsFront&) = delete;

  // Stops accepting, ends the connections and waits for their threads. Idempotent.
  void Stop();

  int port() const { return port_; }

 private:
  TlsFront() = default;
  void AcceptLoop();
  void Relay(int client_fd);

  SSL_CTX* ctx_ = nullptr;
  int listen_fd_ = -1;
  int port_ = 0;
  int backend_port_ = 0;
  std::chrono::milliseconds handshake_timeout_{kHandshakeTimeoutMs};
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::mutex mu_;
  std::condition_variable idle_;
  int active_ = 0;  // guarded by mu_
  common::Logger log_{"console"};
};

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_TLS_FRONT_H_
