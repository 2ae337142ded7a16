#include "common/cpus.h"

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace aviary::common {
namespace {

int HostCores() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

// An OpenMP runtime told to bind (libgomp, loaded with libtorch, pins the initial thread at load
// time) leaves this thread's mask at one place (a core, a socket): then the mask is not the
// process's cores. OMP_PROC_BIND=false turns binding off whatever the places say.
bool OpenMpBinds() {
  auto set = [](const char* name, std::string* value) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') return false;
    *value = absl::AsciiStrToLower(v);
    return true;
  };
  std::string value;
  if (set("OMP_PROC_BIND", &value)) return value != "false";
  if (set("KMP_AFFINITY", &value) && (value == "disabled" || value == "none")) return false;
  for (const char* name : {"OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"}) {
    if (set(name, &value)) return true;
  }
  return false;
}

int CpusetCores();

int AffinityCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) != 0) return HostCores();
  const int n = CPU_COUNT(&set);
  if (n <= 0) return HostCores();
  // Under an OpenMP binding the mask is one place, libgomp's pinning of this thread (a core, or a
  // socket with OMP_PLACES=sockets), not the process's share: its cgroup's cpuset (else the host)
  // says that, and CoresPerRank divides it among the host's ranks.
  if (OpenMpBinds()) {
    const int cpuset = CpusetCores();
    return cpuset > 0 ? cpuset : HostCores();
  }
  return n;
}

std::string ReadSmallFile(const std::string& path) {
  std::ifstream file(path);
  if (!file) return "";
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// This process's cgroup folders, the leaf first and up to the root of the hierarchy that
// `controller` (v1; "" for the v2 unified one) is mounted at.
std::vector<std::string> CgroupFolders(const std::string& controller) {
  std::string path;
  bool found = false;
  std::istringstream lines(ReadSmallFile("/proc/self/cgroup"));
  for (std::string line; std::getline(lines, line);) {
    std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3) continue;
    const bool match = controller.empty() ? parts[0] == "0" && parts[1].empty()
                                          : absl::StrContains(absl::StrCat(",", parts[1], ","), absl::StrCat(",", controller, ","));
    if (match) {
      path = parts[2];
      found = true;
    }
  }
  std::vector<std::string> mounts;
  if (controller.empty()) {
    mounts = {"/sys/fs/cgroup"};
  } else if (controller == "cpu") {
    mounts = {"/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct,cpu", "/sys/fs/cgroup/cpu"};
  } else {
    mounts = {"/sys/fs/cgroup/" + controller};
  }
  std::vector<std::string> folders;
  for (const std::string& mount : mounts) {
    // In a container the recorded path is often the host's and does not exist inside: its
    // own root then holds the container's limits.
    std::string p = found && !path.empty() && path[0] == '/' ? path : "/";
    while (true) {
      folders.push_back(mount + (p == "/" ? "" : p));
      const size_t slash = p.find_last_of('/');
      if (p == "/" || slash == std::string::npos) break;
      p = slash == 0 ? "/" : p.substr(0, slash);
    }
  }
  return folders;
}

// The smallest CPU quota over the cgroup folders (v2 cpu.max, else v1 cfs), in whole cores; 0
// for none.
int QuotaCores() {
  int best = 0;
  auto take = [&best](int cores) {
    if (cores > 0 && (best == 0 || cores < best)) best = cores;
  };
  for (const std::string& dir : CgroupFolders("")) take(CoresOfCgroupQuota(ReadSmallFile(dir + "/cpu.max").c_str()));
  if (best > 0) return best;
  for (const std::string& dir : CgroupFolders("cpu")) {
    std::string quota = ReadSmallFile(dir + "/cpu.cfs_quota_us"), period = ReadSmallFile(dir + "/cpu.cfs_period_us");
    if (quota.empty() || period.empty()) continue;
    take(CoresOfCgroupQuota(absl::StrCat(absl::StripAsciiWhitespace(quota), " ", period).c_str()));
  }
  return best;
}

// The CPUs of this process's cgroup cpuset (v2 cpuset.cpus.effective, else v1
// cpuset.effective_cpus; "0-15,32-47"), 0 when not known.
int CpusetCores() {
  std::vector<std::string> files;
  for (const std::string& dir : CgroupFolders("")) files.push_back(dir + "/cpuset.cpus.effective");
  for (const std::string& dir : CgroupFolders("cpuset")) files.push_back(dir + "/cpuset.effective_cpus");
  for (const std::string& file : files) {
    const std::string text(absl::StripAsciiWhitespace(ReadSmallFile(file)));
    if (text.empty()) continue;
    int count = 0;
    for (absl::string_view range : absl::StrSplit(text, ',')) {
      std::vector<absl::string_view> ends = absl::StrSplit(range, '-');
      int lo = 0, hi = 0;
      if (ends.empty() || ends.size() > 2 || !absl::SimpleAtoi(ends[0], &lo) ||
          !absl::SimpleAtoi(ends.back(), &hi) || hi < lo) {
        return 0;
      }
      count += hi - lo + 1;
    }
    return count;
  }
  return 0;
}

}  // namespace

int CoresOfCgroupQuota(const char* cpu_max) {
  std::istringstream in(cpu_max);
  std::string quota, period;
  if (!(in >> quota >> period) || quota == "max") return 0;
  int64_t q = 0, p = 0;
  if (!absl::SimpleAtoi(quota, &q) || !absl::SimpleAtoi(period, &p) || q <= 0 || p <= 0) return 0;
  const int64_t cores = q / p + (q % p != 0 ? 1 : 0);
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, cores), 1 << 20));
}

int UsableCores() {
  int cores = AffinityCores();
  if (const int quota = QuotaCores(); quota > 0) cores = std::min(cores, quota);
  return std::max(1, cores);
}

int CoresPerRank(int local_ranks) {
  // The pool the host's ranks share: the container's cpuset (else the host), at most its quota.
  int pool = HostCores();
  if (const int cpuset = CpusetCores(); cpuset > 0) pool = std::min(pool, cpuset);
  if (const int quota = QuotaCores(); quota > 0) pool = std::min(pool, quota);
  return std::max(1, std::min(UsableCores(), pool / std::max(1, local_ranks)));
}

int LocalRanksFromEnvironment() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"}) {
    int n = 0;
    if (const char* v = std::getenv(name); v != nullptr && absl::SimpleAtoi(v, &n) && n > 0) return n;
  }
  // An srun step: the most tasks it runs on one node (SLURM_STEP_TASKS_PER_NODE, "4(x2),3"; an
  // sbatch's SLURM_NTASKS_PER_NODE is the allocation's, not the step's), else its tasks over its
  // nodes.
  int tasks = 0, nodes = 0;
  const char* step_tasks = std::getenv("SLURM_STEP_NUM_TASKS");
  if (step_tasks == nullptr || !absl::SimpleAtoi(step_tasks, &tasks) || tasks <= 0) return 1;
  if (const char* v = std::getenv("SLURM_STEP_TASKS_PER_NODE"); v != nullptr) {
    int most = 0;
    for (absl::string_view item : absl::StrSplit(v, ',')) {
      int n = 0;
      if (!absl::SimpleAtoi(item.substr(0, item.find('(')), &n) || n <= 0) {
        most = 0;
        break;
      }
      most = std::max(most, n);
    }
    if (most > 0) return std::min(most, tasks);
  }
  if (const char* v = std::getenv("SLURM_STEP_NUM_NODES"); v != nullptr && absl::SimpleAtoi(v, &nodes) && nodes > 0) {
    return (tasks + nodes - 1) / nodes;
  }
  return tasks;
}

}  // namespace aviary::common
