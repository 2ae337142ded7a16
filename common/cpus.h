// How many cores a process may use: its CPU affinity (taskset, Slurm's or mpirun's binding) and
// its cgroup's CPU quota (a container's --cpus), shared among the ranks of its host. The
// default of every thread-count flag: std::thread::hardware_concurrency() counts the host's
// cores, so 8 ranks on a 64-core node each started 64 decoders, and a container limited to 8
// CPUs on a 128-core host ran 128.
#ifndef AVIARY_COMMON_CPUS_H_
#define AVIARY_COMMON_CPUS_H_

namespace aviary::common {

// The cores this process may run on: the CPUs in its affinity mask (its cgroup's cpuset, else the
// host's cores, when an OpenMP binding variable is set: libgomp pins the first thread to one
// place; OMP_PROC_BIND=false binds nothing), at most its
// cgroup's CPU quota (the smallest on the way to the root: v2 cpu.max, else v1 cfs, rounded
// up), at least 1.
int UsableCores();

// UsableCores(), at most the pool the host's ranks share (its cgroup cpuset, else the host's
// cores, at most the quota) / `local_ranks`, at least 1: ranks bound to their own cores keep
// their binding's count, ranks that share a mask, a container or a socket divide it.
int CoresPerRank(int local_ranks);

// The number of ranks on this host from the launcher's environment (Open MPI, MPICH/PMI; an
// srun step: the most tasks of SLURM_STEP_TASKS_PER_NODE, else its tasks over its nodes), 1 when
// none says.
int LocalRanksFromEnvironment();

// The cgroup v2 quota in `cpu_max` (the file's text: "max 100000" or "250000 100000"), in
// cores rounded up; 0 for none or text it cannot read.
int CoresOfCgroupQuota(const char* cpu_max);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_CPUS_H_
