#include "client/output.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <streambuf>

namespace aviary::cli {
namespace {

// Ends the program as a write to a pipe without a reader does.
[[noreturn]] void DieOfSigpipe() {
  std::signal(SIGPIPE, SIG_DFL);
  std::raise(SIGPIPE);
  std::_Exit(128 + SIGPIPE);  // only if the signal could not end it
}

// std::cout's buffer: descriptor 1, the errno of the first failed write kept. Not thread-safe.
class StdoutBuffer final : public std::streambuf {
 public:
  // closed: descriptor 1 was closed when the program started (now /dev/null): every write fails
  // with EBADF, as it would have.
  StdoutBuffer(bool line_buffered, bool closed) : line_buffered_(line_buffered), closed_(closed) {
    setp(buffer_, buffer_ + sizeof(buffer_));
  }

  // 0 while every write succeeded, else the errno of the first that failed.
  int error() const { return error_; }

 protected:
  int_type overflow(int_type c) override {
    if (!Drain()) return traits_type::eof();
    if (traits_type::eq_int_type(c, traits_type::eof())) return traits_type::not_eof(c);
    *pptr() = traits_type::to_char_type(c);
    pbump(1);
    if (line_buffered_ && traits_type::to_char_type(c) == '\n' && !Drain()) return traits_type::eof();
    return c;
  }

  std::streamsize xsputn(const char* data, std::streamsize size) override {
    if (error_ != 0) return 0;
    std::streamsize done = 0;
    while (done < size) {
      if (pptr() == epptr() && !Drain()) return done;
      const std::streamsize n = std::min<std::streamsize>(size - done, epptr() - pptr());
      std::memcpy(pptr(), data + done, static_cast<size_t>(n));
      pbump(static_cast<int>(n));
      done += n;
    }
    if (line_buffered_ && std::memchr(data, '\n', static_cast<size_t>(size)) != nullptr && !Drain()) return 0;
    return done;
  }

  int sync() override { return Drain() ? 0 : -1; }

 private:
  // Writes out the buffer; false (and error_ set) when a write fails. After a failure every write
  // fails: the output is cut, and the rest must not pretend otherwise.
  bool Drain() {
    if (error_ != 0) return false;
    if (closed_ && pptr() > pbase()) {
      error_ = EBADF;
      setp(buffer_, buffer_ + sizeof(buffer_));
      return false;
    }
    const char* p = pbase();
    while (p < pptr()) {
      const ssize_t n = ::write(STDOUT_FILENO, p, static_cast<size_t>(pptr() - p));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        error_ = n < 0 ? errno : EIO;
        setp(buffer_, buffer_ + sizeof(buffer_));
        return false;
      }
      p += n;
    }
    setp(buffer_, buffer_ + sizeof(buffer_));
    return true;
  }

  const bool line_buffered_;
  const bool closed_;
  int error_ = 0;
  char buffer_[16384];
};

// Never destroyed: std::cout is flushed at exit, after function statics are gone.
StdoutBuffer* stdout_buffer = nullptr;

}  // namespace

void SetUpStdout() {
  // A descriptor 0, 1 or 2 closed by the caller (`aviary list >&-`) would be the next one gRPC
  // opens: the output would go into its socket or event fd. /dev/null holds the place.
  bool stdout_closed = false;
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    if (fd == STDOUT_FILENO) stdout_closed = true;
    const int null_fd = ::open("/dev/null", O_RDWR);  // the lowest free descriptor: fd
    if (null_fd >= 0 && null_fd != fd) ::close(null_fd);
  }
  std::signal(SIGPIPE, SIG_DFL);
  sigset_t pipe_only;
  sigemptyset(&pipe_only);
  sigaddset(&pipe_only, SIGPIPE);
  ::sigprocmask(SIG_UNBLOCK, &pipe_only, nullptr);
  stdout_buffer = new StdoutBuffer(::isatty(STDOUT_FILENO) == 1, stdout_closed);
  std::cout.rdbuf(stdout_buffer);
}

bool StdoutFailed() { return !std::cout.good() || (stdout_buffer != nullptr && stdout_buffer->error() != 0); }

int FinishStdout(const std::string& command, int code) {
  std::cout.flush();
  if (!StdoutFailed()) return code;
  // With SIGPIPE at its default, EPIPE is not seen here: the write that met it ended the program.
  const int error = stdout_buffer != nullptr ? stdout_buffer->error() : 0;
  std::cerr << command << ": cannot write to standard output"
            << (error != 0 ? std::string(": ") + std::strerror(error) : std::string()) << "\n";
  return code == 0 ? 1 : code;
}

ClosedPipeWatcher::ClosedPipeWatcher() {
  struct stat st {};
  if (::fstat(STDOUT_FILENO, &st) != 0 || !(S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))) return;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return;  // no watcher: the next write still ends the program
  stop_read_fd_ = fds[0];
  stop_write_fd_ = fds[1];
  thread_ = std::thread([stop = stop_read_fd_] {
    // events 0 on stdout: poll reports only POLLERR (a pipe's reader closed its end) and POLLHUP
    // (a socket's peer went away), never that it is writable.
    pollfd watched[2] = {{STDOUT_FILENO, 0, 0}, {stop, POLLIN, 0}};
    while (true) {
      if (::poll(watched, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (watched[1].revents != 0) return;
      if (watched[0].revents & (POLLERR | POLLHUP)) DieOfSigpipe();
      if (watched[0].revents & POLLNVAL) return;
    }
  });
}

ClosedPipeWatcher::~ClosedPipeWatcher() {
  if (stop_write_fd_ >= 0) ::close(stop_write_fd_);  // the thread sees POLLHUP on its end
  if (thread_.joinable()) thread_.join();
  if (stop_read_fd_ >= 0) ::close(stop_read_fd_);
}

}  // namespace aviary::cli
