#include "common/cpus.h"

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"

namespace aviary::common {
namespace {

int HostCores() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

int AffinityCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) != 0) return HostCores();
  const int n = CPU_COUNT(&set);
  return n > 0 ? n : HostCores();
}

int QuotaCores() {
  // The process's own cgroup (v2: one line "0::/path"); the mount at /sys/fs/cgroup.
  std::ifstream self("/proc/self/cgroup");
  std::string line, path;
  while (std::getline(self, line)) {
    if (line.rfind("0::", 0) == 0) path = line.substr(3);
  }
  for (const std::string& dir : {"/sys/fs/cgroup" + path, std::string("/sys/fs/cgroup")}) {
    std::ifstream file(dir + "/cpu.max");
    if (!file) continue;
    std::stringstream text;
    text << file.rdbuf();
    return CoresOfCgroupQuota(text.str().c_str());
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
  return static_cast<int>(std::max<int64_t>(1, (q + p - 1) / p));
}

int UsableCores() {
  int cores = AffinityCores();
  if (const int quota = QuotaCores(); quota > 0) cores = std::min(cores, quota);
  return std::max(1, cores);
}

int CoresPerRank(int local_ranks) {
  const int usable = UsableCores();
  const int shared = std::max(1, HostCores() / std::max(1, local_ranks));
  return std::max(1, std::min(usable, shared));
}

int LocalRanksFromEnvironment() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"}) {
    int n = 0;
    if (const char* v = std::getenv(name); v != nullptr && absl::SimpleAtoi(v, &n) && n > 0) return n;
  }
  return 1;
}

}  // namespace aviary::common
