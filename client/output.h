// The `aviary` program's standard output: what happens when it cannot be written (docs/SERVICE.md,
// "Client"). A reader that went away (`aviary list | head -1`) ends the program by SIGPIPE, quietly
// (status 141 in a shell), as it ends cat or grep; any other failed write (a full disk, a closed
// descriptor) is an error: "aviary CMD: cannot write to standard output: REASON", exit 1, where
// exit() alone would drop the buffered output and exit 0.
#ifndef AVIARY_CLIENT_OUTPUT_H_
#define AVIARY_CLIENT_OUTPUT_H_

#include <string>
#include <thread>

namespace aviary::cli {

// Call first in main(), before any thread starts (threads inherit the signal mask):
// - SIGPIPE to its default action and unblocked, whatever the parent left (systemd services and
//   some runtimes start their children with it ignored; a closed pipe was then a silent failed
//   write and exit 0);
// - descriptors 0, 1 and 2 that the caller closed (`aviary list >&-`) hold /dev/null, or gRPC's
//   next socket or event fd would get them, and the output with it; a write to a closed standard
//   output still fails with EBADF;
// - std::cout writes to descriptor 1 through a buffer of its own that keeps the errno of the first
//   failed write (stdio drops its buffer and the reason when a write fails mid-output), line by
//   line on a terminal, else in blocks and at every flush.
// std::cout stays usable from one thread at a time, as before.
void SetUpStdout();

// True once a write to std::cout has failed.
bool StdoutFailed();

// Flushes std::cout. On a failed write, now or earlier, prints "<command>: cannot write to
// standard output: REASON" to stderr and returns `code`, or 1 when `code` is 0; else returns
// `code`. `command` is how the error names the program, e.g. "aviary list".
int FinishStdout(const std::string& command, int code);

// While alive, ends the program by SIGPIPE as soon as standard output is a pipe or socket whose
// reader has gone, without waiting for the next write: `watch` and `logs --follow` may write
// nothing for minutes (`aviary watch JOB | head -1` on a quiet job waited until the job changed).
// Does nothing when standard output is a terminal or a file. One thread blocked in poll(2); not
// copyable; the destructor stops and joins it.
class ClosedPipeWatcher {
 public:
  ClosedPipeWatcher();
  ~ClosedPipeWatcher();
  ClosedPipeWatcher(const ClosedPipeWatcher&) = delete;
  ClosedPipeWatcher& operator=(const ClosedPipeWatcher&) = delete;

 private:
  int stop_read_fd_ = -1;  // a pipe whose write end the destructor closes to wake the thread
  int stop_write_fd_ = -1;
  std::thread thread_;
};

}  // namespace aviary::cli

#endif  // AVIARY_CLIENT_OUTPUT_H_
