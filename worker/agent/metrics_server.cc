#include "worker/agent/metrics_server.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <prometheus/text_serializer.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace aviary::worker {
namespace {

constexpr size_t kMaxRequestBytes = 16 << 10;
constexpr int kRequestTimeoutS = 5;

const common::Logger& Log() {
  static const common::Logger logger("metrics");
  return logger;
}

std::string Response(int code, const char* reason, const std::string& content_type,
                     const std::string& body, bool head) {
  std::string out = absl::StrCat("HTTP/1.1 ", code, " ", reason, "\r\nContent-Type: ", content_type,
                                 "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n");
  if (!head) out += body;
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& listen, std::shared_ptr<prometheus::Collectable> collectable) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("cannot serve /metrics on '", listen, "': ", why));
  };
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) return bad("expected HOST:PORT");
  std::string host = listen.substr(0, colon);
  const std::string port_text = listen.substr(colon + 1);
  int port_number = 0;
  if (!absl::SimpleAtoi(port_text, &port_number) || port_number < 0 || port_number > 65535) {
    return bad(absl::StrCat("port '", port_text, "' is not a number in 0..65535"));
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.empty()) return bad("empty host (use 0.0.0.0 for every interface)");

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (int rc = ::getaddrinfo(host.c_str(), port_text.c_str(), &hints, &found); rc != 0) {
    return bad(absl::StrCat("cannot resolve '", host, "': ", ::gai_strerror(rc)));
  }
  int fd = -1;
  std::string last_error = "no address";
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = absl::StrCat("socket: ", std::strerror(errno));
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 64) == 0 &&
        ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK) == 0) {
      break;
    }
    last_error = std::strerror(errno);
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(found);
  if (fd < 0) return bad(last_error);
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
    ::close(fd);
    return bad(absl::StrCat("getsockname: ", std::strerror(errno)));
  }
  const int port = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                     : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  int wake[2];
  if (::pipe2(wake, O_CLOEXEC) != 0) {
    ::close(fd);
    return bad(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  std::unique_ptr<MetricsServer> server(new MetricsServer(fd, wake[0], wake[1], port, std::move(collectable)));
  server->thread_ = std::thread([s = server.get()] { s->Serve(); });
  return server;
}

MetricsServer::MetricsServer(int listen_fd, int wake_read, int wake_write, int port,
                             std::shared_ptr<prometheus::Collectable> collectable)
    : listen_fd_(listen_fd),
      wake_read_(wake_read),
      wake_write_(wake_write),
      port_(port),
      collectable_(std::move(collectable)) {}

MetricsServer::~MetricsServer() {
  const char stop = 's';
  while (::write(wake_write_, &stop, 1) < 0 && errno == EINTR) {
  }
  if (thread_.joinable()) thread_.join();
  ::close(listen_fd_);
  ::close(wake_read_);
  ::close(wake_write_);
}

// One connection's state: its request until complete, then its answer until sent, each within
// kRequestTimeoutS.
struct MetricsServer::Connection {
  int fd = -1;
  std::chrono::steady_clock::time_point deadline;
  std::string request;
  std::string answer;  // empty while reading
  size_t sent = 0;
};

void MetricsServer::Serve() {
  // Connections are served side by side: one at a time, each idle client (a port scan, a hung
  // scraper) held the next scrape up to 5 s, and two of them ran past Prometheus' 10 s scrape
  // timeout. At most kMaxConnections are open; the rest wait in the listen backlog.
  constexpr size_t kMaxConnections = 32;
  std::vector<Connection> connections;
  // After accept fails for want of descriptors (EMFILE), the connection stays queued and the
  // listening socket readable: it is left out of poll for a while (the loop spun at full CPU).
  std::chrono::steady_clock::time_point accept_again{};
  bool said_accept_error = false;
  int poll_failures = 0;  // in a row
  while (true) {
    const auto now = std::chrono::steady_clock::now();
    const bool accepting = connections.size() < kMaxConnections && now >= accept_again;
    std::vector<pollfd> fds;
    fds.push_back({wake_read_, POLLIN, 0});
    fds.push_back({accepting ? listen_fd_ : -1, POLLIN, 0});
    // Woken for the accept backoff's end only while it runs (full, the listening socket is left
    // out until a connection ends: a wake-up at a past backoff spun the loop at full CPU).
    auto wake_at = now < accept_again ? accept_again : std::chrono::steady_clock::time_point::max();
    for (const Connection& c : connections) {
      fds.push_back({c.fd, static_cast<short>(c.answer.empty() ? POLLIN : POLLOUT), 0});
      wake_at = std::min(wake_at, c.deadline);
    }
    int timeout_ms = -1;
    if (wake_at != std::chrono::steady_clock::time_point::max()) {
      timeout_ms = static_cast<int>(std::clamp<int64_t>(
          std::chrono::duration_cast<std::chrono::milliseconds>(wake_at - now).count() + 1, 0, 60000));
    }
    const int rc = ::poll(fds.data(), fds.size(), timeout_ms);
    if (rc < 0) {
      if (errno == EINTR) continue;
      // Not expected (ENOMEM): said, and tried again a little later rather than ending /metrics
      // at the first failure without a word; after 10 s of them it ends (the wake pipe cannot be
      // read without poll: the destructor's join would wait for ever).
      if (++poll_failures > 50) {
        Log().Warn(absl::StrCat("/metrics on port ", port_, ": poll: ", std::strerror(errno),
                                " for 10 s; no longer serving"));
        break;
      }
      if (poll_failures == 1) {
        Log().Warn(absl::StrCat("/metrics on port ", port_, ": poll: ", std::strerror(errno), "; retrying"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      continue;
    }
    poll_failures = 0;
    if (fds[0].revents != 0) break;  // stopping
    // The connections first (fds[2..] are connections[0..] as they were), then the new ones.
    const auto after = std::chrono::steady_clock::now();
    std::vector<Connection> kept;
    kept.reserve(connections.size() + 1);
    for (size_t i = 0; i < connections.size(); ++i) {
      Connection& c = connections[i];
      if (Step(&c, fds[i + 2].revents, after)) {
        kept.push_back(std::move(c));
      } else {
        ::close(c.fd);
      }
    }
    connections = std::move(kept);
    if (accepting && fds[1].revents != 0) {
      // One connection per wake-up: the listening socket is non-blocking, so a client gone
      // before the accept leaves nothing to wait for.
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd >= 0) {
        Connection c;
        c.fd = fd;
        c.deadline = after + std::chrono::seconds(kRequestTimeoutS);
        connections.push_back(std::move(c));
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED &&
                 errno != EPROTO) {
        if (!said_accept_error) {
          Log().Warn(absl::StrCat("/metrics on port ", port_, ": accept: ", std::strerror(errno),
                                  "; scrapes wait until it succeeds (said once)"));
          said_accept_error = true;
        }
        accept_again = after + std::chrono::milliseconds(250);
      }
    }
  }
  for (Connection& c : connections) ::close(c.fd);
}

// Moves `c` on after poll said `revents`; false when it is done (answered, gone or out of time).
bool MetricsServer::Step(Connection* c, short revents, std::chrono::steady_clock::time_point now) const {
  if (c->answer.empty()) {
    // The whole request within kRequestTimeoutS, not each read: a client sending a byte every
    // few seconds held the serving thread (every scrape waited) and the group's exit for hours.
    if (revents != 0) {
      char buf[4096];
      const ssize_t n = ::recv(c->fd, buf, sizeof(buf), 0);
      if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) return now < c->deadline;
      if (n <= 0) return false;  // closed or failed
      c->request.append(buf, static_cast<size_t>(n));
    }
    if (c->request.size() > kMaxRequestBytes) {
      c->answer = Response(431, "Request Header Fields Too Large", "text/plain", "request too large\n", false);
    } else if (c->request.find("\r\n\r\n") != std::string::npos || c->request.find("\n\n") != std::string::npos) {
      c->answer = Answer(c->request);
    } else {
      return now < c->deadline;  // no complete request yet
    }
    c->deadline = now + std::chrono::seconds(kRequestTimeoutS);  // for the answer
    revents = POLLOUT;  // try at once: the socket is most likely writable
  }
  if ((revents & (POLLOUT | POLLERR | POLLHUP)) != 0) {
    const ssize_t n = ::send(c->fd, c->answer.data() + c->sent, c->answer.size() - c->sent, MSG_NOSIGNAL);
    if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) return false;  // the scraper went
    if (n > 0) c->sent += static_cast<size_t>(n);
    if (c->sent == c->answer.size()) return false;  // answered: Connection: close
  }
  return now < c->deadline;
}

std::string MetricsServer::Answer(const std::string& request) const {
  const std::string line = request.substr(0, request.find_first_of("\r\n"));
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string::npos ? std::string::npos : line.find(' ', sp1 + 1);
  if (sp2 == std::string::npos) return Response(400, "Bad Request", "text/plain", "bad request line\n", false);
  const std::string method = line.substr(0, sp1);
  std::string path = line.substr(sp1 + 1, sp2 - sp1 - 1);
  path = path.substr(0, path.find('?'));
  const bool head = method == "HEAD";
  if (method != "GET" && !head) {
    return Response(405, "Method Not Allowed", "text/plain", "only GET and HEAD\n", false);
  }
  if (path != "/metrics" && path != "/") {
    return Response(404, "Not Found", "text/plain", "not found: try /metrics\n", head);
  }
  const std::string body = prometheus::TextSerializer().Serialize(collectable_->Collect());
  return Response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", body, head);
}

}  // namespace aviary::worker
