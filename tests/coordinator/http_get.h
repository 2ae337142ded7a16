// An HTTP/1.0 GET against a loopback port, for the coordinator tests that read /metrics; and
// the output of a command run by the shell (curl, the `aviary` client).
#ifndef AVIARY_TESTS_COORDINATOR_HTTP_GET_H_
#define AVIARY_TESTS_COORDINATOR_HTTP_GET_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"

namespace aviary::coordinator {

// An HTTP/1.0 GET of http://127.0.0.1:port/path; the body ("" when the server did not answer).
inline std::string HttpGet(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if (::send(fd, request.data(), request.size(), 0) == static_cast<ssize_t>(request.size())) {
      char buffer[4096];
      ssize_t n;
      while ((n = ::recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, n);
    }
  }
  ::close(fd);
  const size_t body = response.find("\r\n\r\n");
  return body == std::string::npos ? "" : response.substr(body + 4);
}

// What `command` (run by /bin/sh) printed on stdout, and its pclose() status in `*status` when
// given (-1 when it could not start).
inline std::string CommandOutput(const std::string& command, int* status = nullptr) {
  FILE* pipe = ::popen(command.c_str(), "r");
  std::string out;
  if (pipe == nullptr) {
    if (status != nullptr) *status = -1;
    return out;
  }
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, n);
  const int closed = ::pclose(pipe);
  if (status != nullptr) *status = closed;
  return out;
}

}  // namespace aviary::coordinator

#endif  // AVIARY_TESTS_COORDINATOR_HTTP_GET_H_
