#include "common/files.h"

#include <sched.h>

#include <dirent.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/cpus.h"
#include "gtest/gtest.h"

namespace aviary::common {
namespace {

// A new directory of its own (mkdtemp): "<pid>_<name>" was not fresh once a pid came round
// again, and an earlier run's history.csv directory failed the rename test.
std::string FreshDir(const std::string& name) {
  std::string dir = absl::StrCat(::testing::TempDir(), "/aviary_files_", name, "_XXXXXX");
  if (::mkdtemp(dir.data()) == nullptr) ADD_FAILURE() << "mkdtemp " << dir << ": " << std::strerror(errno);
  return dir;
}

std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

// Two threads of one process writing one path (the temporary name is per process): each write
// succeeds and the file is one of them, whole. They shared "<path>.tmp.<suffix>": one truncated
// the other's temporary file mid-write, and one rename found it already gone.
TEST(WriteFileAtomicallyTest, TwoThreadsWritingOnePathEachWriteWhole) {
  const std::string dir = FreshDir("two_writers");
  const std::string path = dir + "/history.csv";
  const std::string a(512 * 1024, 'a');
  const std::string b(512 * 1024 + 7, 'b');
  std::vector<absl::Status> failed[2];
  auto write = [&](int k) {
    for (int i = 0; i < 25; ++i) {
      absl::Status st = WriteFileAtomically(path, k == 0 ? a : b);
      if (!st.ok()) failed[k].push_back(st);
    }
  };
  std::thread first(write, 0);
  std::thread second(write, 1);
  first.join();
  second.join();
  for (const auto& list : failed) {
    for (const absl::Status& st : list) ADD_FAILURE() << st;
  }
  auto now = ReadFileToString(path);
  ASSERT_TRUE(now.ok()) << now.status();
  EXPECT_TRUE(*now == a || *now == b) << "size " << now->size();
  EXPECT_EQ(Entries(dir), std::vector<std::string>{"history.csv"});
}

// An output a user names as a symbolic link (a chain of them, a relative one, a dangling one) is
// written through: its target gets the contents and the link stays. The rename used to replace
// the link with a file and leave its target as it was; a loop is refused. Other writes (a run
// folder's files) replace a link, as before.
TEST(WriteFileAtomicallyTest, WritesThroughSymbolicLinks) {
  const std::string dir = FreshDir("symlinks");
  ASSERT_EQ(::mkdir((dir + "/shared").c_str(), 0755), 0);
  ASSERT_TRUE(WriteFileAtomically(dir + "/shared/folds.csv", "old").ok());
  ASSERT_EQ(::symlink("shared/folds.csv", (dir + "/hop.csv").c_str()), 0);
  ASSERT_EQ(::symlink((dir + "/hop.csv").c_str(), (dir + "/link.csv").c_str()), 0);
  ASSERT_TRUE(WriteOutputFileAtomically(dir + "/link.csv", "new").ok());
  EXPECT_EQ(*ReadFileToString(dir + "/shared/folds.csv"), "new");
  struct stat st = {};
  ASSERT_EQ(::lstat((dir + "/link.csv").c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
  // Not an output: the link is replaced, its target left alone.
  ASSERT_EQ(::symlink("shared/folds.csv", (dir + "/run_file.csv").c_str()), 0);
  ASSERT_TRUE(WriteFileAtomically(dir + "/run_file.csv", "run").ok());
  EXPECT_EQ(*ReadFileToString(dir + "/shared/folds.csv"), "new");
  ASSERT_EQ(::lstat((dir + "/run_file.csv").c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  ASSERT_EQ(::symlink("shared/absent.csv", (dir + "/dangling.csv").c_str()), 0);
  ASSERT_TRUE(WriteOutputFileAtomically(dir + "/dangling.csv", "made").ok());
  EXPECT_EQ(*ReadFileToString(dir + "/shared/absent.csv"), "made");
  EXPECT_EQ(Entries(dir + "/shared"), (std::vector<std::string>{"absent.csv", "folds.csv"}));  // no temporary left
  ASSERT_EQ(::symlink("loop_b.csv", (dir + "/loop_a.csv").c_str()), 0);
  ASSERT_EQ(::symlink("loop_a.csv", (dir + "/loop_b.csv").c_str()), 0);
  const absl::Status loop = WriteOutputFileAtomically(dir + "/loop_a.csv", "x");
  EXPECT_EQ(loop.code(), absl::StatusCode::kInvalidArgument) << loop;
  EXPECT_TRUE(absl::StrContains(loop.message(), "too many levels of symbolic links")) << loop;
  // In a sticky world-writable folder (/tmp) another user's link is not followed (the kernel's
  // protected_symlinks rule): a planted `--port-file /tmp/p` link would write where it points.
  // Needs root to give a link another owner.
  const std::string sticky = dir + "/sticky";
  ASSERT_EQ(::mkdir(sticky.c_str(), 0777), 0);
  ASSERT_EQ(::chmod(sticky.c_str(), 01777), 0);
  ASSERT_EQ(::symlink((dir + "/shared/folds.csv").c_str(), (sticky + "/planted").c_str()), 0);
  if (::geteuid() == 0 && ::lchown((sticky + "/planted").c_str(), 65534, 65534) == 0) {
    const absl::Status planted = WriteOutputFileAtomically(sticky + "/planted", "owned");
    EXPECT_EQ(planted.code(), absl::StatusCode::kPermissionDenied) << planted;
    EXPECT_TRUE(absl::StrContains(planted.message(), "a symbolic link of another user (uid 65534)")) << planted;
    EXPECT_EQ(*ReadFileToString(dir + "/shared/folds.csv"), "new");
  }
}

// A user's data file is read whole (not mapped: a mapped file truncated under the reader raised
// SIGBUS in the coordinator); an empty one and a /proc file (size 0 to stat) read too. A FIFO
// (which blocked the reader for good) and a device (/dev/zero filled memory) are refused at once
// naming the path, and so is a file past the cap; other errors are ReadFileToString's.
TEST(ReadRegularFileTest, ReadsRegularFilesAndRefusesPipesDevicesAndTooLarge) {
  const std::string dir = FreshDir("regular");
  const std::string path = dir + "/meta.csv";
  std::string big(3 * 65536 + 17, 'x');
  for (size_t i = 0; i < big.size(); i += 101) big[i] = static_cast<char>('a' + i % 26);
  ASSERT_TRUE(WriteFileAtomically(path, big).ok());
  auto whole = ReadRegularFile(path, big.size());
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(*whole, big);
  auto over = ReadRegularFile(path, big.size() - 1);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(over.status().message(), path + ": larger than")) << over.status();

  ASSERT_TRUE(WriteFileAtomically(dir + "/empty.csv", "").ok());
  auto empty = ReadRegularFile(dir + "/empty.csv", 10);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(*empty, "");

  auto proc = ReadRegularFile("/proc/self/status", 1 << 20);
  ASSERT_TRUE(proc.ok()) << proc.status();
  EXPECT_TRUE(absl::StrContains(*proc, "Name:")) << *proc;

  const std::string fifo = dir + "/fifo.csv";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const std::string& odd : {fifo, std::string("/dev/zero")}) {
    auto refused = ReadRegularFile(odd, size_t{1} << 30);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << odd;
    EXPECT_TRUE(absl::StrContains(refused.status().message(), odd + ": not a regular file")) << refused.status();
  }

  auto proc_string = ReadFileToString("/proc/self/status");
  ASSERT_TRUE(proc_string.ok()) << proc_string.status();
  EXPECT_TRUE(absl::StrContains(*proc_string, "Name:"));
  auto read = ReadFileToString(path);
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(*read, big);
  // A cap: a file of its size reads; one byte over is refused naming the path, and a file with
  // no size (/dev/zero) stops at the cap rather than filling memory.
  auto capped = ReadFileToString(path, big.size());
  ASSERT_TRUE(capped.ok()) << capped.status();
  EXPECT_EQ(*capped, big);
  auto over_string = ReadFileToString(path, big.size() - 1);
  EXPECT_EQ(over_string.status().code(), absl::StatusCode::kInvalidArgument);
  auto zero = ReadFileToString("/dev/zero", 1 << 20);
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(zero.status().message(), "/dev/zero: larger than 1048576 bytes")) << zero.status();

  EXPECT_EQ(ReadRegularFile(dir + "/nope.csv", 10).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(ReadRegularFile(dir + "/nope.csv", 10).status().message(), dir + "/nope.csv"));
  EXPECT_EQ(ReadRegularFile(dir, 10).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(ReadRegularFile(dir, 10).status().message(), "is a directory"));
}

// A file read in several opens is the same file throughout, or UNAVAILABLE naming it.
TEST(FileVersionTest, AReplacedOrRemovedFileIsNamed) {
  const std::string dir = FreshDir("version");
  const std::string path = dir + "/last.pt";
  ASSERT_TRUE(WriteFileAtomically(path, "epoch 1").ok());
  const std::optional<FileVersion> before = VersionOf(path);
  ASSERT_TRUE(before.has_value());
  EXPECT_TRUE(CheckUnchanged(path, before).ok());
  // The next epoch's file, renamed over it (same size: the inode tells them apart).
  ASSERT_TRUE(WriteFileAtomically(path, "epoch 2").ok());
  absl::Status replaced = CheckUnchanged(path, before);
  EXPECT_EQ(replaced.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(replaced.message(), path + ": replaced or changed while it was read")) << replaced;
  ASSERT_EQ(std::remove(path.c_str()), 0);
  EXPECT_TRUE(absl::StrContains(CheckUnchanged(path, VersionOf(dir)).message(), path + ": removed"));
  EXPECT_FALSE(VersionOf(path).has_value());
  EXPECT_TRUE(CheckUnchanged(path, std::nullopt).ok());
}

TEST(AtomicWriteTest, ARefusedCommitKeepsThePreviousFileAndLeavesNoTemporary) {
  const std::string dir = FreshDir("refused");
  const std::string path = dir + "/last.pt";
  ASSERT_TRUE(WriteFileAtomically(path, "old").ok());
  AtomicWriteOptions options;
  std::string checked;
  options.check = [&](const std::string& p) {
    checked = p;
    return absl::AbortedError(absl::StrCat("lease gone; not writing ", p));
  };
  absl::Status st = WriteFileAtomically(path, "new", options);
  EXPECT_TRUE(absl::IsAborted(st)) << st;
  EXPECT_EQ(checked, path);
  EXPECT_FALSE(StorageFaultOf(st).has_value());  // a fence is not the disk's fault
  EXPECT_EQ(*ReadFileToString(path), "old");
  EXPECT_EQ(Entries(dir), std::vector<std::string>{"last.pt"});
}

TEST(AtomicWriteTest, KeepsThePreviousVersionWhenAsked) {
  const std::string dir = FreshDir("previous");
  AtomicWriteOptions options;
  options.keep_previous_as = dir + "/last.prev.pt";
  ASSERT_TRUE(WriteFileAtomically(dir + "/last.pt", "epoch 1", options).ok());
  EXPECT_EQ(::access(options.keep_previous_as.c_str(), F_OK), -1);  // nothing to keep yet
  ASSERT_TRUE(WriteFileAtomically(dir + "/last.pt", "epoch 2", options).ok());
  EXPECT_EQ(*ReadFileToString(dir + "/last.pt"), "epoch 2");
  EXPECT_EQ(*ReadFileToString(options.keep_previous_as), "epoch 1");
  // The staged names (.tmp., then .ready. once the check allowed it) are gone after the write,
  // and a write the check refuses never gets the .ready. name.
  EXPECT_EQ(Entries(dir), (std::vector<std::string>{"last.prev.pt", "last.pt"}));
  std::vector<std::string> seen;
  options.check = [&](const std::string& p) {
    seen = Entries(dir);
    return absl::AbortedError("lease gone");
  };
  EXPECT_TRUE(absl::IsAborted(WriteFileAtomically(dir + "/last.pt", "epoch 3", options)));
  EXPECT_EQ(seen, (std::vector<std::string>{"last.prev.pt", "last.pt", absl::StrCat("last.pt.tmp.", TemporarySuffix())}));
  EXPECT_EQ(Entries(dir), (std::vector<std::string>{"last.prev.pt", "last.pt"}));
  EXPECT_EQ(*ReadFileToString(dir + "/last.pt"), "epoch 2");
}

// Temporary names carry the pid and a number drawn once per process: two processes of one pid
// (two containers) never write one temporary file. The tidy-up's matcher takes them and the
// bare pid of earlier versions, nothing else.
TEST(FilesTest, TemporarySuffixIsThePidAndADrawnNumber) {
  const std::string& suffix = TemporarySuffix();
  EXPECT_EQ(&suffix, &TemporarySuffix());  // drawn once
  EXPECT_TRUE(absl::StartsWith(suffix, absl::StrCat(::getpid(), "."))) << suffix;
  EXPECT_TRUE(IsTemporarySuffix(suffix));
  EXPECT_TRUE(IsTemporarySuffix("4242"));
  for (const char* other : {"", ".", "4242.", ".17", "4242.17.3", "42a", "4242.x", "old"}) {
    EXPECT_FALSE(IsTemporarySuffix(other)) << other;
  }
}

TEST(AtomicWriteTest, AFailedRenameIsAStorageFaultNamingPathAndErrno) {
  const std::string dir = FreshDir("rename");
  const std::string path = dir + "/history.csv";
  // A non-empty directory where the file should go: the rename fails (EISDIR).
  ASSERT_EQ(::mkdir(path.c_str(), 0755), 0);
  ASSERT_TRUE(WriteFileAtomically(path + "/x", "x").ok());
  absl::Status st = WriteFileAtomically(path, "epoch,step\n");
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(absl::StrContains(st.message(), path)) << st;
  EXPECT_TRUE(absl::StrContains(st.message(), "(EISDIR)")) << st;
  auto fault = StorageFaultOf(st);
  ASSERT_TRUE(fault.has_value());
  EXPECT_EQ(fault->path, path);
  EXPECT_EQ(fault->dir, dir);
  EXPECT_EQ(fault->num_bytes, 11);
  EXPECT_EQ(fault->error, EISDIR);
  EXPECT_EQ(Entries(dir), std::vector<std::string>{"history.csv"});  // no temporary left
}

// A real ENOSPC needs a full filesystem: tests/integration/service_storage.sh fills a tmpfs.
TEST(AtomicWriteTest, StorageFaultPayloadRoundTripsAndErrnoIsNamed) {
  EXPECT_EQ(ErrnoText(ENOSPC), "No space left on device (ENOSPC)");
  StorageFault f{"/runs/a/last.pt", "/runs/a", 1234, ENOSPC};
  auto back = StorageFaultOf(WithStorageFault(absl::ResourceExhaustedError("x"), f));
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->path, f.path);
  EXPECT_EQ(back->dir, f.dir);
  EXPECT_EQ(back->num_bytes, 1234);
  EXPECT_EQ(back->error, ENOSPC);
}

// A run folder with files, nested folders and links (to a file and a folder outside it, and a
// dangling one): everything in it goes, the links' targets stay.
TEST(RemoveTreeNoFollowTest, RemovesTheTreeAndNeverALinksTarget) {
  const std::string dir = FreshDir("remove_tree");
  const std::string outside = dir + "/outside";
  ASSERT_EQ(::mkdir(outside.c_str(), 0755), 0);
  ASSERT_TRUE(WriteFileAtomically(outside + "/keep.txt", "mine").ok());
  const std::string run = dir + "/j0123456789ab";
  ASSERT_EQ(::mkdir(run.c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((run + "/finetune-fold0").c_str(), 0755), 0);
  ASSERT_TRUE(WriteFileAtomically(run + "/finetune-fold0/last.pt", "x").ok());
  ASSERT_TRUE(WriteFileAtomically(run + "/history.csv", "y").ok());
  ASSERT_EQ(::symlink(outside.c_str(), (run + "/finetune-fold0/to_folder").c_str()), 0);
  ASSERT_EQ(::symlink((outside + "/keep.txt").c_str(), (run + "/to_file").c_str()), 0);
  ASSERT_EQ(::symlink((dir + "/gone").c_str(), (run + "/dangling").c_str()), 0);
  int64_t removed = 0;
  ASSERT_TRUE(RemoveTreeNoFollow(dir, "j0123456789ab", &removed).ok());
  EXPECT_EQ(removed, 7);  // 2 files, 3 links, 2 folders
  EXPECT_EQ(Entries(dir), std::vector<std::string>{"outside"});
  EXPECT_EQ(Entries(outside), std::vector<std::string>{"keep.txt"});
  // The top entry itself a link: the link goes, not its target.
  ASSERT_EQ(::symlink(outside.c_str(), (dir + "/j1").c_str()), 0);
  ASSERT_TRUE(RemoveTreeNoFollow(dir, "j1").ok());
  EXPECT_EQ(Entries(outside), std::vector<std::string>{"keep.txt"});
  // Not one component; a missing entry names the path.
  EXPECT_EQ(RemoveTreeNoFollow(dir, "../x").code(), absl::StatusCode::kInvalidArgument);
  absl::Status missing = RemoveTreeNoFollow(dir, "j2");
  EXPECT_FALSE(missing.ok());
  EXPECT_TRUE(absl::StrContains(missing.message(), dir + "/j2")) << missing;
}

TEST(ProbeWritableTest, NamesTheFolderAndTheSpaceNeeded) {
  const std::string dir = FreshDir("probe");
  EXPECT_TRUE(ProbeWritable(dir, 4096).ok());
  EXPECT_TRUE(Entries(dir).empty());  // the probe file is removed
  absl::Status st = ProbeWritable(dir, int64_t{1} << 62);
  EXPECT_TRUE(absl::IsResourceExhausted(st)) << st;
  EXPECT_TRUE(absl::StrContains(st.message(), dir)) << st;
  EXPECT_FALSE(ProbeWritable(dir + "/missing", 1).ok());
}

// Standard error is a SOCK_SEQPACKET socket here, so each write(2) is one message: the line and
// its newline must arrive as one (a std::cerr `<<` chain sends one message per piece).
TEST(WriteLineToStderrTest, WritesTheLineAndItsNewlineInOneWrite) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET, 0, fds), 0) << ErrnoText(errno);
  const int saved = ::dup(STDERR_FILENO);
  ASSERT_GE(saved, 0);
  ASSERT_GE(::dup2(fds[1], STDERR_FILENO), 0);
  const std::string line = absl::StrCat("aviary: rank ", 1, " of ", 2, " ends the group: ", std::string(300, 'x'));
  WriteLineToStderr(line);
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  std::string got(8192, '\0');
  const ssize_t n = ::recv(fds[0], got.data(), got.size(), MSG_DONTWAIT);
  ::close(fds[0]);
  ::close(fds[1]);
  ASSERT_GT(n, 0) << ErrnoText(errno);
  got.resize(static_cast<size_t>(n));
  EXPECT_EQ(got, line + "\n");
}

// The default thread counts (common/cpus.h): a container's quota in whole cores, the calling
// thread's affinity, and the host's cores shared among its ranks.
TEST(CpusTest, CgroupQuotaInWholeCores) {
  EXPECT_EQ(CoresOfCgroupQuota("max 100000\n"), 0);
  EXPECT_EQ(CoresOfCgroupQuota("250000 100000\n"), 3);
  EXPECT_EQ(CoresOfCgroupQuota("50000 100000"), 1);
  EXPECT_EQ(CoresOfCgroupQuota("200000 100000"), 2);
  EXPECT_EQ(CoresOfCgroupQuota(""), 0);
  EXPECT_EQ(CoresOfCgroupQuota("lots"), 0);
  EXPECT_EQ(CoresOfCgroupQuota("-5 100000"), 0);
  EXPECT_EQ(CoresOfCgroupQuota("17592186044415000 1000"), 1 << 20);  // v1's largest: clamped, not wrapped
}

TEST(CpusTest, AffinityAndRanksBoundTheCount) {
  const int host = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int usable = UsableCores();
  EXPECT_GE(usable, 1);
  EXPECT_LE(usable, host);
  EXPECT_EQ(CoresPerRank(1), usable);
  EXPECT_EQ(CoresPerRank(host), 1);
  EXPECT_EQ(CoresPerRank(4 * host), 1);
  cpu_set_t saved, one;
  ASSERT_EQ(::sched_getaffinity(0, sizeof(saved), &saved), 0);
  CPU_ZERO(&one);
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &saved)) {
      CPU_SET(cpu, &one);
      break;
    }
  }
  ASSERT_EQ(::sched_setaffinity(0, sizeof(one), &one), 0);  // this thread: taskset -c to one core
  EXPECT_EQ(UsableCores(), 1);
  EXPECT_EQ(CoresPerRank(1), 1);
  // With an OpenMP binding variable the mask is libgomp's pinning, not the process's;
  // OMP_PROC_BIND=false binds nothing, whatever the places say.
  for (const char* name : {"OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"}) ::unsetenv(name);
  ::setenv("OMP_PROC_BIND", "true", 1);
  if (usable == host) {  // (else a quota or cpuset limits it anyway)
    EXPECT_EQ(UsableCores(), host);
  }
  ::setenv("OMP_PROC_BIND", "false", 1);
  ::setenv("OMP_PLACES", "cores", 1);
  EXPECT_EQ(UsableCores(), 1);
  ::unsetenv("OMP_PROC_BIND");
  EXPECT_EQ(UsableCores() == 1, usable == 1);  // OMP_PLACES alone binds
  ::unsetenv("OMP_PLACES");
  ASSERT_EQ(::sched_setaffinity(0, sizeof(saved), &saved), 0);
}

TEST(CpusTest, LocalRanksFromTheLaunchersEnvironment) {
  ::unsetenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  ::unsetenv("MPI_LOCALNRANKS");
  ::unsetenv("PMI_LOCAL_SIZE");
  EXPECT_EQ(LocalRanksFromEnvironment(), 1);
  ::setenv("MPI_LOCALNRANKS", "3", 1);
  EXPECT_EQ(LocalRanksFromEnvironment(), 3);
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8", 1);
  EXPECT_EQ(LocalRanksFromEnvironment(), 8);
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "x", 1);
  EXPECT_EQ(LocalRanksFromEnvironment(), 3);
  ::unsetenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  ::unsetenv("MPI_LOCALNRANKS");
  // An srun step of 8 tasks on 2 nodes; its tasks per node "3(x2),2" (the most: 3; the
  // allocation's SLURM_NTASKS_PER_NODE is not the step's); a batch script (no step).
  ::setenv("SLURM_STEP_NUM_TASKS", "8", 1);
  ::setenv("SLURM_STEP_NUM_NODES", "2", 1);
  ::setenv("SLURM_NTASKS_PER_NODE", "7", 1);
  EXPECT_EQ(LocalRanksFromEnvironment(), 4);
  ::setenv("SLURM_STEP_TASKS_PER_NODE", "3(x2),2", 1);
  EXPECT_EQ(LocalRanksFromEnvironment(), 3);
  ::setenv("SLURM_STEP_TASKS_PER_NODE", "junk", 1);
  EXPECT_EQ(LocalRanksFromEnvironment(), 4);
  ::unsetenv("SLURM_STEP_NUM_TASKS");
  EXPECT_EQ(LocalRanksFromEnvironment(), 1);
  ::unsetenv("SLURM_STEP_NUM_NODES");
  ::unsetenv("SLURM_NTASKS_PER_NODE");
  ::unsetenv("SLURM_STEP_TASKS_PER_NODE");
}

}  // namespace
}  // namespace aviary::common
