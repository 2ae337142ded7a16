#include "coordinator/tls_front.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace aviary::coordinator {
namespace {

constexpr int kPollMs = 200;
// A write to the client that makes no progress for this long ends the connection.
constexpr auto kWriteStall = std::chrono::seconds(10);

// Milliseconds from now to `deadline`, at most kPollMs and at least 0.
int PollMsUntil(std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kPollMs, left.count())));
}

std::string OpenSslError() {
  const unsigned long code = ERR_get_error();
  if (code == 0) return "no OpenSSL error";
  char text[256];
  ERR_error_string_n(code, text, sizeof(text));
  return text;
}

// Loads the certificate chain and the key from PEM text into `ctx`; messages start with
// `cert_name` or `key_name`.
absl::Status LoadPem(SSL_CTX* ctx, const std::string& cert_pem, const std::string& key_pem,
                     const std::string& cert_name = "tls_cert_file", const std::string& key_name = "tls_key_file") {
  BIO* cert_bio = BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size()));
  X509* cert = cert_bio != nullptr ? PEM_read_bio_X509_AUX(cert_bio, nullptr, nullptr, nullptr) : nullptr;
  bool ok = cert != nullptr && SSL_CTX_use_certificate(ctx, cert) == 1;
  if (cert != nullptr) X509_free(cert);
  while (ok) {  // the rest of the chain
    X509* extra = PEM_read_bio_X509(cert_bio, nullptr, nullptr, nullptr);
    if (extra == nullptr) {
      ERR_clear_error();  // the end of the file
      break;
    }
    if (SSL_CTX_add_extra_chain_cert(ctx, extra) != 1) {
      X509_free(extra);
      ok = false;
    }
  }
  if (cert_bio != nullptr) BIO_free(cert_bio);
  if (!ok) return absl::InvalidArgumentError(absl::StrCat(cert_name, ": not a PEM certificate: ", OpenSslError()));
  BIO* key_bio = BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size()));
  // No passphrase: OpenSSL's default callback would prompt on the terminal (and gRPC cannot use
  // an encrypted key at all).
  pem_password_cb* no_passphrase = [](char*, int, int, void*) { return 0; };
  EVP_PKEY* key = key_bio != nullptr ? PEM_read_bio_PrivateKey(key_bio, nullptr, no_passphrase, nullptr) : nullptr;
  if (key_bio != nullptr) BIO_free(key_bio);
  if (key == nullptr) {
    if (key_pem.find("ENCRYPTED") != std::string::npos) {
      ERR_clear_error();
      return absl::InvalidArgumentError(absl::StrCat(
          key_name, ": an encrypted private key (a passphrase) is not supported; write it decrypted, readable by the "
                    "coordinator only: openssl pkey -in KEY -out KEY.plain && chmod 600 KEY.plain"));
    }
    return absl::InvalidArgumentError(absl::StrCat(key_name, ": not a PEM private key: ", OpenSslError()));
  }
  ok = SSL_CTX_use_PrivateKey(ctx, key) == 1;  // refuses a key of another certificate
  EVP_PKEY_free(key);
  if (!ok || SSL_CTX_check_private_key(ctx) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(key_name, ": the key does not match the certificate of ", cert_name, ": ", OpenSslError()));
  }
  return absl::OkStatus();
}

bool SendAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// SSL_write of the whole buffer on a non-blocking socket (waits for POLLOUT when told to).
// False when the peer fails, `stop` is set, or no byte went out for kWriteStall (a client that
// does not read).
bool SslWriteAll(SSL* ssl, int fd, const char* data, int size, const std::atomic<bool>& stop) {
  auto deadline = std::chrono::steady_clock::now() + kWriteStall;
  while (size > 0 && !stop) {
    const int n = SSL_write(ssl, data, size);
    if (n > 0) {
      data += n;
      size -= n;
      deadline = std::chrono::steady_clock::now() + kWriteStall;
      continue;
    }
    const int err = SSL_get_error(ssl, n);
    if (err != SSL_ERROR_WANT_WRITE && err != SSL_ERROR_WANT_READ) return false;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    pollfd p{fd, static_cast<short>(err == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN), 0};
    if (::poll(&p, 1, PollMsUntil(deadline)) < 0 && errno != EINTR) return false;
  }
  return size == 0;
}

// SSL_accept on a non-blocking socket, all of it within `deadline` (a client that trickles a
// byte now and then cannot hold the thread longer) and ending early when `stop` is set.
bool SslAcceptBy(SSL* ssl, int fd, std::chrono::steady_clock::time_point deadline, const std::atomic<bool>& stop) {
  while (!stop) {
    const int n = SSL_accept(ssl);
    if (n == 1) return true;
    const int err = SSL_get_error(ssl, n);
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) return false;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    pollfd p{fd, static_cast<short>(err == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN), 0};
    if (::poll(&p, 1, PollMsUntil(deadline)) < 0 && errno != EINTR) return false;
  }
  return false;
}

}  // namespace

absl::Status CheckTlsPem(const std::string& cert_pem, const std::string& key_pem, const std::string& cert_name,
                         const std::string& key_name) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == nullptr) return absl::InternalError(absl::StrCat("SSL_CTX_new: ", OpenSslError()));
  absl::Status loaded = LoadPem(ctx, cert_pem, key_pem, cert_name, key_name);
  ERR_clear_error();
  SSL_CTX_free(ctx);
  return loaded;
}

absl::Status CheckTlsCaPem(const std::string& ca_pem, const std::string& name) {
  ERR_clear_error();
  BIO* bio = BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size()));
  if (bio == nullptr) return absl::InternalError(absl::StrCat("BIO_new_mem_buf: ", OpenSslError()));
  int certificates = 0;
  // As gRPC reads it (PEM_read_bio_X509_AUX: "TRUSTED CERTIFICATE" blocks too).
  while (X509* cert = PEM_read_bio_X509_AUX(bio, nullptr, nullptr, nullptr)) {
    X509_free(cert);
    ++certificates;
  }
  BIO_free(bio);
  // The loop ends at the end of the text (PEM_R_NO_START_LINE), or at a block that does not parse.
  const unsigned long last = ERR_peek_last_error();
  const bool clean_end = ERR_GET_LIB(last) == ERR_LIB_PEM && ERR_GET_REASON(last) == PEM_R_NO_START_LINE;
  if (certificates == 0 || (last != 0 && !clean_end)) {
    const std::string why = last != 0 && !clean_end ? OpenSslError() : "no certificate in it";
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat(name, ": not a PEM certificate list: ",
                                                   certificates > 0 ? absl::StrCat("after ", certificates, " certificate(s), ") : "",
                                                   why));
  }
  ERR_clear_error();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TlsFront>> TlsFront::Start(const std::string& listen, int backend_port,
                                                          const std::string& cert_pem, const std::string& key_pem,
                                                          int handshake_timeout_ms) {
  if (handshake_timeout_ms <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("handshake_timeout_ms ", handshake_timeout_ms, ": expected > 0"));
  }
  std::unique_ptr<TlsFront> front(new TlsFront());
  front->backend_port_ = backend_port;
  front->handshake_timeout_ = std::chrono::milliseconds(handshake_timeout_ms);
  front->ctx_ = SSL_CTX_new(TLS_server_method());
  if (front->ctx_ == nullptr) return absl::InternalError(absl::StrCat("SSL_CTX_new: ", OpenSslError()));
  SSL_CTX_set_min_proto_version(front->ctx_, TLS1_2_VERSION);
  if (absl::Status loaded = LoadPem(front->ctx_, cert_pem, key_pem); !loaded.ok()) return loaded;

  const size_t colon = listen.rfind(':');
  int port = -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 || port > 65535 ||
      ::inet_pton(AF_INET, listen.substr(0, colon).c_str(), &addr.sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("console_listen '", listen, "': not IPv4-ADDRESS:PORT"));
  }
  addr.sin_port = htons(static_cast<uint16_t>(port));
  front->listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  if (front->listen_fd_ < 0 || ::setsockopt(front->listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
      ::bind(front->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(front->listen_fd_, 64) != 0) {
    return absl::UnavailableError(
        absl::StrCat("console_listen ", listen, ": cannot listen there: ", std::strerror(errno)));
  }
  socklen_t len = sizeof(addr);
  if (::getsockname(front->listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return absl::UnavailableError(absl::StrCat("console_listen ", listen, ": getsockname: ", std::strerror(errno)));
  }
  front->port_ = ntohs(addr.sin_port);
  front->acceptor_ = std::thread([f = front.get()] { f->AcceptLoop(); });
  return front;
}

TlsFront::~TlsFront() {
  Stop();
  if (ctx_ != nullptr) SSL_CTX_free(ctx_);
}

void TlsFront::Stop() {
  stop_ = true;
  if (acceptor_.joinable()) acceptor_.join();
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    listen_fd_ = -1;
  }
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [this] { return active_ == 0; });
}

void TlsFront::AcceptLoop() {
  bool out_of_descriptors = false;
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, kPollMs);
    if (ready <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      const int error = errno;
      if (error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM) {
        // The connection stays queued, so the next poll returns at once: without a pause this
        // loop spun a core until descriptors were freed. Said once per spell.
        if (!out_of_descriptors) {
          log_.Warn(absl::StrCat("console (TLS): cannot accept a connection: ", std::strerror(error),
                                    "; retrying every ", kPollMs, " ms (raise the open-file limit, LimitNOFILE=)"));
        }
        out_of_descriptors = true;
        std::this_thread::sleep_for(std::chrono::milliseconds(kPollMs));
      }
      continue;
    }
    if (out_of_descriptors) log_.Info("console (TLS): accepting connections again");
    out_of_descriptors = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (active_ >= kMaxConnections) {
        ::close(fd);
        continue;
      }
      ++active_;
    }
    try {
      std::thread([this, fd] {
        Relay(fd);
        std::lock_guard<std::mutex> lock(mu_);
        if (--active_ == 0) idle_.notify_all();
      }).detach();
    } catch (const std::system_error& e) {
      // No thread (EAGAIN: a pid or cgroup limit): this connection is dropped, the console goes on.
      ::close(fd);
      log_.Warn(absl::StrCat("console (TLS): cannot start a thread for a connection: ", e.what()));
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) idle_.notify_all();
    }
  }
}

void TlsFront::Relay(int client_fd) {
  const auto handshake_deadline = std::chrono::steady_clock::now() + handshake_timeout_;
  // Non-blocking from the start: every wait is a poll that also looks at stop_ and the deadline.
  const int flags = ::fcntl(client_fd, F_GETFL);
  SSL* ssl = flags >= 0 && ::fcntl(client_fd, F_SETFL, flags | O_NONBLOCK) == 0 ? SSL_new(ctx_) : nullptr;
  int backend = -1;
  if (ssl != nullptr && SSL_set_fd(ssl, client_fd) == 1 && SslAcceptBy(ssl, client_fd, handshake_deadline, stop_)) {
    backend = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(backend_port_));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (backend >= 0 && ::connect(backend, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      char buffer[16384];
      bool open = true;
      while (open && !stop_) {
        // Decrypted bytes OpenSSL holds already count as readable.
        pollfd p[2] = {{client_fd, POLLIN, 0}, {backend, POLLIN, 0}};
        const int ready = SSL_pending(ssl) > 0 ? 1 : ::poll(p, 2, kPollMs);
        if (ready < 0 && errno != EINTR) break;
        if (SSL_pending(ssl) > 0 || (p[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
          const int n = SSL_read(ssl, buffer, sizeof(buffer));
          if (n > 0) {
            open = SendAll(backend, buffer, static_cast<size_t>(n));
          } else {
            const int err = SSL_get_error(ssl, n);
            open = err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE;
          }
        }
        if (open && (p[1].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
          const ssize_t n = ::recv(backend, buffer, sizeof(buffer), 0);
          open = n > 0 && SslWriteAll(ssl, client_fd, buffer, static_cast<int>(n), stop_);
        }
      }
      SSL_shutdown(ssl);
    }
  }
  ERR_clear_error();
  if (ssl != nullptr) SSL_free(ssl);
  if (backend >= 0) ::close(backend);
  ::close(client_fd);
}

}  // namespace aviary::coordinator
