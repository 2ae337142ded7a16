#include "worker/agent/metrics_server.h"

#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <thread>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/registry.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace aviary::worker {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// A connection to 127.0.0.1:port.
int Connect(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  return fd;
}

// One HTTP exchange with 127.0.0.1:port; the whole answer.
std::string Exchange(int port, const std::string& request) {
  const int fd = Connect(port);
  EXPECT_EQ(::send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

// The server works in a process that links a CUDA libtorch (the CUDA configuration builds this
// test against one): prometheus-cpp's civetweb Exposer could not start there (metrics_server.h).
TEST(MetricsServerTest, ServesTheRegistryAndRefusesOtherRequests) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto& family = prometheus::BuildCounter().Name("aviary_test_total").Help("a test").Register(*registry);
  family.Add({{"group_id", "g1"}}).Increment(3);
  auto server = MetricsServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  ASSERT_GT(port, 0);

  std::string ok = Exchange(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_THAT(ok, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(ok, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  EXPECT_THAT(ok, HasSubstr("aviary_test_total{group_id=\"g1\"} 3"));
  // Prometheus' scrapes carry a query string sometimes; the root answers too.
  EXPECT_THAT(Exchange(port, "GET /?x=1 HTTP/1.0\r\n\r\n"), HasSubstr("aviary_test_total"));
  std::string head = Exchange(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_THAT(head, StartsWith("HTTP/1.1 200 OK"));
  EXPECT_THAT(head, ::testing::Not(HasSubstr("aviary_test_total")));
  EXPECT_THAT(Exchange(port, "GET /admin HTTP/1.1\r\n\r\n"), StartsWith("HTTP/1.1 404"));
  EXPECT_THAT(Exchange(port, "POST /metrics HTTP/1.1\r\n\r\n"), StartsWith("HTTP/1.1 405"));
  EXPECT_THAT(Exchange(port, "nonsense\r\n\r\n"), StartsWith("HTTP/1.1 400"));
  EXPECT_THAT(Exchange(port, "GET /metrics HTTP/1.1\r\nX: " + std::string(20000, 'a') + "\r\n\r\n"),
              StartsWith("HTTP/1.1 431"));
  // A client that connects and says nothing does not stop the next scrape for long.
  const int idle = Connect(port);
  family.Add({{"group_id", "g1"}}).Increment(1);
  EXPECT_THAT(Exchange(port, "GET /metrics HTTP/1.1\r\n\r\n"), HasSubstr("aviary_test_total{group_id=\"g1\"} 4"));
  ::close(idle);
  // Nor one that sends its request a byte at a time, each within the 5 s a read used to get: the
  // request as a whole has 5 s, then the connection is closed (it held the one serving thread,
  // and the group's exit, for as long as it went on: 16 KB at a byte per 4 s is 18 hours).
  const int trickle = Connect(port);
  const std::string slow = "GET /metrics HTTP/1.1\r\nX-Padding: " + std::string(40, 'a') + "\r\n\r\n";
  size_t sent = 0;
  for (; sent < slow.size(); ++sent) {
    if (::send(trickle, slow.data() + sent, 1, MSG_NOSIGNAL) != 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(250));  // 60 bytes: 15 s in all
    char byte;
    if (::recv(trickle, &byte, 1, MSG_DONTWAIT) == 0) break;  // the server closed it
  }
  EXPECT_LT(sent, slow.size()) << "the server waited for the whole trickled request";
  ::close(trickle);
  EXPECT_THAT(Exchange(port, "GET /metrics HTTP/1.1\r\n\r\n"), HasSubstr("aviary_test_total{group_id=\"g1\"} 4"));
}

// Idle clients are served beside the scrape, not before it: the scrape is answered while they
// are still open (one connection at a time, each had to time out first: 5 s apiece, and two
// ran past Prometheus' 10 s scrape timeout).
TEST(MetricsServerTest, IdleClientsDoNotHoldUpAScrape) {
  auto registry = std::make_shared<prometheus::Registry>();
  prometheus::BuildCounter().Name("aviary_test_total").Help("a test").Register(*registry).Add({}).Increment(2);
  auto server = MetricsServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  std::vector<int> idle;
  for (int i = 0; i < 3; ++i) idle.push_back(Connect(port));
  EXPECT_THAT(Exchange(port, "GET /metrics HTTP/1.1\r\n\r\n"), HasSubstr("aviary_test_total 2"));
  for (int fd : idle) {
    char byte;
    errno = 0;
    const ssize_t n = ::recv(fd, &byte, 1, MSG_DONTWAIT);
    EXPECT_TRUE(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        << "an idle client was closed (timed out) before the scrape was answered: recv " << n;
    ::close(fd);
  }
}

// The CPU the process used over `seconds` of sleep, in ms.
long CpuMsOver(double seconds) {
  const auto cpu_us = [] {
    rusage r{};
    ::getrusage(RUSAGE_SELF, &r);
    return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1000000L + r.ru_utime.tv_usec + r.ru_stime.tv_usec;
  };
  const long before = cpu_us();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  return (cpu_us() - before) / 1000;
}

// Out of descriptors, accept fails and the connection stays queued: the thread waits between
// tries instead of spinning (it took a whole core until a descriptor came free). In a child, so
// that the limit binds nothing else; the CPU the process used over a second of it is the check.
TEST(MetricsServerTest, OutOfDescriptorsTheServerWaitsInsteadOfSpinning) {
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(pipe_fds[0]);
    auto registry = std::make_shared<prometheus::Registry>();
    auto server = MetricsServer::Start("127.0.0.1:0", registry);
    if (!server.ok()) ::_exit(2);
    // Every descriptor below the limit taken but one, which the client's socket takes: the
    // connection can only wait in the listen queue, and the server's accept gets EMFILE (a
    // client connected first was often accepted before the descriptors ran out).
    const int probe = ::dup(0);
    rlimit limit{};
    ::getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = static_cast<rlim_t>(probe + 8);
    if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::_exit(3);
    int last = probe;
    for (int fd; (fd = ::dup(0)) >= 0;) last = fd;
    if (errno != EMFILE) ::_exit(4);
    ::close(last);
    const int client = Connect((*server)->port());
    if (client < 0) ::_exit(5);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the server meets the EMFILE
    const long used_ms = CpuMsOver(1.0);
    (void)!::write(pipe_fds[1], &used_ms, sizeof(used_ms));
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  long used_ms = -1;
  const ssize_t n = ::read(pipe_fds[0], &used_ms, sizeof(used_ms));
  ::close(pipe_fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  ASSERT_EQ(n, static_cast<ssize_t>(sizeof(used_ms)));
  EXPECT_LT(used_ms, 500) << "the server spun on a failing accept: " << used_ms << " ms of CPU in 1 s";
}

// Full (32 connections open), the listening socket is left out of poll until one ends; the
// loop woke at once for a backoff long past and spun a core (anyone reaching the port could
// keep it so with 32 idle connections). A scrape beyond them waits in the queue and is answered
// once one times out.
TEST(MetricsServerTest, ThirtyTwoIdleConnectionsDoNotSpinTheServer) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto server = MetricsServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(server.ok()) << server.status();
  std::vector<int> idle;
  for (int i = 0; i < 40; ++i) idle.push_back(Connect((*server)->port()));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the server takes its 32
  const long used_ms = CpuMsOver(1.0);
  EXPECT_LT(used_ms, 500) << "the full server spun: " << used_ms << " ms of CPU in 1 s";
  for (int fd : idle) ::close(fd);
}

TEST(MetricsServerTest, BadListenAddressesAreErrorsNamingThem) {
  auto registry = std::make_shared<prometheus::Registry>();
  for (const char* listen : {"no-port", "127.0.0.1:99999", "127.0.0.1:http", ":9471", "no.such.host.invalid:0"}) {
    auto server = MetricsServer::Start(listen, registry);
    ASSERT_FALSE(server.ok()) << listen;
    EXPECT_THAT(std::string(server.status().message()),
                HasSubstr(std::string("cannot serve /metrics on '") + listen + "'"));
  }
  auto first = MetricsServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(first.ok());
  auto second = MetricsServer::Start("127.0.0.1:" + std::to_string((*first)->port()), registry);
  ASSERT_FALSE(second.ok());
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("Address already in use"));
}

}  // namespace
}  // namespace aviary::worker
