#include "coordinator/store.h"

#include <sqlite3.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/content_hash.h"
#include "gtest/gtest.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat("/tmp/aviary_store_", ::getpid(), "_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    path_ = root_ + "/aviary.db";
  }
  void TearDown() override { fs::remove_all(root_); }

  // Runs `sql` on the file through a separate connection.
  void RawExec(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    char* error = nullptr;
    const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
    EXPECT_EQ(rc, SQLITE_OK) << (error ? error : "");
    sqlite3_free(error);
    ASSERT_EQ(sqlite3_close(db), SQLITE_OK);
  }

  std::string root_;
  std::string path_;
};

TEST_F(StoreTest, RowsSurviveCloseAndReopen) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    JobRow job;
    job.seq = 7;
    job.info.set_job_id("j0123456789ab");
    job.info.set_state(aviary::v1::JOB_STATE_RUNNING);
    job.info.set_name("demo");
    TaskRow task;
    task.seq = 0;
    task.info.set_task_id("j0123456789ab/pretrain-f0");
    task.info.set_job_id("j0123456789ab");
    task.info.set_state(aviary::v1::TASK_STATE_LEASED);
    task.info.set_group_id("gaaaaaaaaaaaa");
    task.info.set_attempt(2);
    task.resume_checkpoint = "/runs/last.pt";
    TaskPayload payload{"class,a,0\n", "seed: 1\n", ""};
    GroupRow group;
    group.group_id = "gaaaaaaaaaaaa";
    group.task_id = task.info.task_id();
    group.registered_unix_ms = 1234;
    group.info.set_world_size(4);
    aviary::v1::Metrics point;
    point.set_epoch(3);
    point.set_epoch_end(true);
    point.set_val_auc(0.5);
    ASSERT_TRUE((*store)
                    ->Transaction([&]() -> absl::Status {
                      AVIARY_RETURN_IF_ERROR((*store)->PutJob(job));
                      AVIARY_RETURN_IF_ERROR((*store)->InsertTask(task, payload));
                      AVIARY_RETURN_IF_ERROR((*store)->PutGroup(group));
                      AVIARY_RETURN_IF_ERROR((*store)->AddPoints(job.info.job_id(), task.info.task_id(), 2, 99, {point}));
                      AVIARY_RETURN_IF_ERROR((*store)->AddCheckpoint(task.info.task_id(), 2, "/runs/best.pt", 3, true, 99));
                      return (*store)->SetCounter("groups_lost_total", 5);
                    })
                    .ok());
    ASSERT_TRUE((*store)->Close().ok());
  }
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto jobs = (*store)->LoadJobs();
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  ASSERT_EQ(jobs->size(), 1u);
  EXPECT_EQ((*jobs)[0].seq, 7);
  EXPECT_EQ((*jobs)[0].info.name(), "demo");
  EXPECT_EQ((*jobs)[0].info.state(), aviary::v1::JOB_STATE_RUNNING);
  auto tasks = (*store)->LoadTasks();
  ASSERT_TRUE(tasks.ok()) << tasks.status();
  ASSERT_EQ(tasks->size(), 1u);
  EXPECT_EQ((*tasks)[0].info.group_id(), "gaaaaaaaaaaaa");
  EXPECT_EQ((*tasks)[0].info.attempt(), 2);
  EXPECT_EQ((*tasks)[0].resume_checkpoint, "/runs/last.pt");
  EXPECT_EQ((*tasks)[0].manifest_hash, Sha256Hex("class,a,0\n"));
  auto payload = (*store)->LoadTaskPayload("j0123456789ab/pretrain-f0");
  ASSERT_TRUE(payload.ok()) << payload.status();
  EXPECT_EQ(payload->manifest_hash, Sha256Hex("class,a,0\n"));
  EXPECT_EQ(payload->manifest_csv, "");
  EXPECT_EQ(payload->pipeline_yaml, "seed: 1\n");
  auto manifest = (*store)->LoadManifest(payload->manifest_hash);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(*manifest, "class,a,0\n");
  auto groups = (*store)->LoadGroups();
  ASSERT_TRUE(groups.ok());
  ASSERT_EQ(groups->size(), 1u);
  EXPECT_EQ((*groups)[0].info.world_size(), 4);
  EXPECT_EQ((*groups)[0].task_id, "j0123456789ab/pretrain-f0");
  auto points = (*store)->LoadEpochEnds("j0123456789ab");
  ASSERT_TRUE(points.ok());
  ASSERT_EQ(points->size(), 1u);
  EXPECT_EQ((*points)[0].metrics.val_auc(), 0.5);
  EXPECT_EQ((*points)[0].attempt, 2);
  auto latest = (*store)->LoadLatestEpochEnds();
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->at("j0123456789ab/pretrain-f0").metrics.epoch(), 3);
  EXPECT_EQ(latest->at("j0123456789ab/pretrain-f0").time_unix_ms, 99);
  EXPECT_EQ(latest->at("j0123456789ab/pretrain-f0").attempt, 2);
  auto checkpoints = (*store)->LoadCheckpoints("j0123456789ab/pretrain-f0");
  ASSERT_TRUE(checkpoints.ok());
  ASSERT_EQ(checkpoints->size(), 1u);
  EXPECT_TRUE((*checkpoints)[0].best);
  auto counter = (*store)->GetCounter("groups_lost_total");
  ASSERT_TRUE(counter.ok());
  EXPECT_EQ(*counter, 5);
  auto absent = (*store)->GetCounter("never_set");
  ASSERT_TRUE(absent.ok());
  EXPECT_EQ(*absent, 0);
}

// A damaged job or task row stops the readers with DATA_LOSS naming the row (the scheduler cannot
// go on without it; nothing is changed); a damaged group row or metric point is skipped, counted
// and described.
TEST_F(StoreTest, DamagedRowsAreNamedOrSkipped) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    JobRow job;
    job.info.set_job_id("j0123456789ab");
    TaskRow task;
    task.info.set_task_id("j0123456789ab/pretrain-f0");
    task.info.set_job_id("j0123456789ab");
    GroupRow group;
    group.group_id = "gaaaaaaaaaaaa";
    group.task_id = task.info.task_id();
    aviary::v1::Metrics first, second;
    first.set_epoch(0);
    first.set_epoch_end(true);
    second.set_epoch(1);
    second.set_epoch_end(true);
    ASSERT_TRUE((*store)
                    ->Transaction([&]() -> absl::Status {
                      AVIARY_RETURN_IF_ERROR((*store)->PutJob(job));
                      AVIARY_RETURN_IF_ERROR((*store)->InsertTask(task, TaskPayload{"a\n", "", ""}));
                      AVIARY_RETURN_IF_ERROR((*store)->PutGroup(group));
                      return (*store)->AddPoints(job.info.job_id(), task.info.task_id(), 1, 5,
                                                 {first, second});
                    })
                    .ok());
    ASSERT_TRUE((*store)->Close().ok());
  }
  // 0xff starts a varint that never ends: no protobuf parser takes it.
  RawExec("UPDATE groups SET info=x'ff'; UPDATE metric_points SET metrics=x'ff' WHERE epoch=0");
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    auto groups = (*store)->LoadGroups();
    ASSERT_TRUE(groups.ok()) << groups.status();
    EXPECT_TRUE(groups->empty());
    auto points = (*store)->LoadEpochEnds("j0123456789ab");
    ASSERT_TRUE(points.ok()) << points.status();
    ASSERT_EQ(points->size(), 1u);
    EXPECT_EQ((*points)[0].metrics.epoch(), 1);
    std::vector<std::string> described;
    EXPECT_EQ((*store)->TakeDamagedRows(&described), 2);
    ASSERT_EQ(described.size(), 2u);
    EXPECT_NE(described[0].find("group gaaaaaaaaaaaa: its column info does not parse"), std::string::npos)
        << described[0];
    EXPECT_NE(described[1].find("metric point 1 (task j0123456789ab/pretrain-f0): its column metrics"),
              std::string::npos)
        << described[1];
    EXPECT_EQ((*store)->TakeDamagedRows(nullptr), 0);  // taken
    // The same rows read again (restore reads points twice) are not counted again.
    ASSERT_TRUE((*store)->LoadLastPoints().ok());
    ASSERT_TRUE((*store)->LoadEpochEnds("j0123456789ab").ok());
    EXPECT_EQ((*store)->TakeDamagedRows(nullptr), 0);
    auto tasks = (*store)->LoadTasks();
    ASSERT_TRUE(tasks.ok()) << tasks.status();
    ASSERT_TRUE((*store)->Close().ok());
  }
  RawExec("UPDATE tasks SET info=x'ff'");
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    auto tasks = (*store)->LoadTasks();
    EXPECT_EQ(tasks.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(tasks.status().message().find("task j0123456789ab/pretrain-f0: its column info does not "
                                            "parse as aviary.v1.TaskInfo"),
              std::string::npos)
        << tasks.status();
    EXPECT_NE(tasks.status().message().find("nothing was changed"), std::string::npos) << tasks.status();
    ASSERT_TRUE((*store)->Close().ok());
  }
  RawExec("UPDATE jobs SET info=x'ff'");
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto jobs = (*store)->LoadJobs();
  EXPECT_EQ(jobs.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(jobs.status().message().find("job j0123456789ab: its column info does not parse"),
            std::string::npos)
      << jobs.status();
}

// A damaged row whose blob still parses but names another job or task (here: another row's blob)
// is DATA_LOSS naming the row, like one that does not parse: kept, every write of the task missed
// its row, and a job's was written back as a second row.
TEST_F(StoreTest, ARowWhoseInfoNamesAnotherIdIsDamaged) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    JobRow a, b;
    a.info.set_job_id("j0123456789ab");
    b.info.set_job_id("jbbbbbbbbbbbb");
    b.seq = 1;
    TaskRow first, second;
    first.info.set_task_id("j0123456789ab/pretrain-f0");
    first.info.set_job_id("j0123456789ab");
    second.info.set_task_id("j0123456789ab/finetune-f0");
    second.info.set_job_id("j0123456789ab");
    ASSERT_TRUE((*store)
                    ->Transaction([&]() -> absl::Status {
                      AVIARY_RETURN_IF_ERROR((*store)->PutJob(a));
                      AVIARY_RETURN_IF_ERROR((*store)->PutJob(b));
                      AVIARY_RETURN_IF_ERROR((*store)->InsertTask(first, TaskPayload{"a\n", "", ""}));
                      return (*store)->InsertTask(second, TaskPayload{"a\n", "", ""});
                    })
                    .ok());
    ASSERT_TRUE((*store)->LoadTasks().ok());
    ASSERT_TRUE((*store)->LoadJobs().ok());
  }
  RawExec("UPDATE tasks SET info=(SELECT info FROM tasks WHERE task_id='j0123456789ab/finetune-f0') "
          "WHERE task_id='j0123456789ab/pretrain-f0'");
  RawExec("UPDATE jobs SET info=(SELECT info FROM jobs WHERE job_id='jbbbbbbbbbbbb') WHERE job_id='j0123456789ab'");
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto tasks = (*store)->LoadTasks();
  EXPECT_EQ(tasks.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(tasks.status().message().find("task j0123456789ab/pretrain-f0: its stored info names task "
                                          "'j0123456789ab/finetune-f0'"),
            std::string::npos)
      << tasks.status();
  auto jobs = (*store)->LoadJobs();
  EXPECT_EQ(jobs.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(jobs.status().message().find("job j0123456789ab: its stored info names job 'jbbbbbbbbbbbb'"),
            std::string::npos)
      << jobs.status();
}

// An exception out of a transaction's body (std::bad_alloc in a large submit; gRPC answers it
// UNKNOWN and the server goes on) rolls the transaction back and leaves the store usable: the
// next transaction commits, as another connection sees. It used to stay open for good, every
// later write "nested" in it and none committed.
TEST_F(StoreTest, AnExceptionInATransactionRollsItBack) {
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  JobRow job;
  job.info.set_job_id("j0123456789ab");
  EXPECT_THROW((void)(*store)->Transaction([&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR((*store)->PutJob(job));
    throw std::bad_alloc();
  }),
               std::bad_alloc);
  job.info.set_job_id("jbbbbbbbbbbbb");
  // Outside a transaction a mutator is refused (it would commit on its own, on the connection
  // another thread's transaction may hold): nothing is written.
  const absl::Status outside = (*store)->PutJob(job);
  EXPECT_EQ(outside.code(), absl::StatusCode::kInternal) << outside;
  EXPECT_NE(outside.message().find("PutJob called outside Transaction()"), absl::string_view::npos) << outside;
  EXPECT_EQ((*store)->SetCounter("x", 1).code(), absl::StatusCode::kInternal);
  const absl::StatusOr<std::vector<JobRow>> jobs = (*store)->LoadJobs();
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_TRUE(std::none_of(jobs->begin(), jobs->end(), [](const JobRow& j) { return j.info.job_id() == "jbbbbbbbbbbbb"; }));
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->PutJob(job); }).ok());
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT group_concat(job_id) FROM jobs", -1, &stmt, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  const unsigned char* ids = sqlite3_column_text(stmt, 0);  // NULL: no job committed
  EXPECT_EQ(ids == nullptr ? std::string("(none)") : std::string(reinterpret_cast<const char*>(ids)), "jbbbbbbbbbbbb");
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

// ReportCheckpoint sent again after its answer was lost records the checkpoint once; the same
// file written at another epoch, or by another attempt, is a row of its own.
TEST_F(StoreTest, ACheckpointReportedAgainIsStoredOnce) {
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string task_id = "j0123456789ab/pretrain-f0";
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint(task_id, 1, "/runs/last.pt", 0, false, 10); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint(task_id, 1, "/runs/last.pt", 0, false, 11); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint(task_id, 1, "/runs/last.pt", 1, false, 12); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint(task_id, 1, "/runs/best.pt", 1, true, 12); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint(task_id, 2, "/runs/last.pt", 1, false, 13); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint(task_id, 2, "/runs/last.pt", 1, false, 14); }).ok());
  auto rows = (*store)->LoadCheckpoints(task_id);
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->size(), 4u);
  EXPECT_EQ((*rows)[0].epoch, 0);
  EXPECT_EQ((*rows)[1].epoch, 1);
  EXPECT_TRUE((*rows)[2].best);
  EXPECT_EQ((*rows)[3].attempt, 2);

  // A job's checkpoints in one query, by task, oldest first; another job's (even one whose id
  // sorts next to it) are not among them.
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint("j0123456789ab/finetune-f1", 1, "/runs/f1/last.pt", 0, false, 15); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint("j0123456789ac/finetune-f0", 1, "/other/last.pt", 0, false, 16); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddCheckpoint("j0123456789aa/finetune-f0", 1, "/other/last.pt", 0, false, 17); }).ok());
  auto job = (*store)->LoadJobCheckpoints("j0123456789ab");
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_EQ(job->size(), 2u);
  ASSERT_EQ(job->at(task_id).size(), 4u);
  EXPECT_EQ(job->at(task_id)[2].path, "/runs/best.pt");
  EXPECT_EQ(job->at(task_id)[3].attempt, 2);
  ASSERT_EQ(job->at("j0123456789ab/finetune-f1").size(), 1u);
  EXPECT_EQ(job->at("j0123456789ab/finetune-f1")[0].path, "/runs/f1/last.pt");
  auto none = (*store)->LoadJobCheckpoints("j00000000000f");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

// Of a task's step points only the newest per attempt is stored (each report's last replaces the
// one before): the table stays the size of the epoch history, not 40,000 rows a day per running
// task. The epoch ends all stay, and the newest point of each attempt is what a restart shows.
TEST_F(StoreTest, OnlyTheNewestStepPointOfAnAttemptIsStored) {
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string job_id = "j0123456789ab", task_id = "j0123456789ab/pretrain-f0";
  auto point = [](int step, bool epoch_end) {
    aviary::v1::Metrics m;
    m.set_epoch(step / 10);
    m.set_step(step);
    m.set_epoch_end(epoch_end);
    return m;
  };
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddPoints(job_id, task_id, 1, 10, {point(1, false), point(2, false)}); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddPoints(job_id, task_id, 1, 11, {point(3, false), point(10, true)}); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddPoints(job_id, task_id, 1, 12, {point(11, false), point(12, false)}); }).ok());
  ASSERT_TRUE((*store)->Transaction([&] { return (*store)->AddPoints(job_id, task_id, 2, 13, {point(4, false)}); }).ok());
  auto last = (*store)->LoadLastPoints();
  ASSERT_TRUE(last.ok()) << last.status();
  std::map<int, int64_t> steps;  // attempt -> its newest point's step
  std::map<int, int64_t> times;  // attempt -> when its newest point arrived
  for (const PointRow& row : *last) {
    steps[row.attempt] = row.metrics.step();
    times[row.attempt] = row.time_unix_ms;
  }
  EXPECT_EQ(steps, (std::map<int, int64_t>{{1, 12}, {2, 4}}));
  EXPECT_EQ(times, (std::map<int, int64_t>{{1, 12}, {2, 13}}));
  auto ends = (*store)->LoadEpochEnds(job_id);
  ASSERT_TRUE(ends.ok()) << ends.status();
  ASSERT_EQ(ends->size(), 1u);
  (*store)->Close().IgnoreError();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT count(*) FROM metric_points WHERE epoch_end=0", -1, &stmt, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int64(stmt, 0), 2);  // one per attempt
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

// Manifests are stored once per content, deflated (a pool's paths compress about tenfold), and
// read back exactly; a task may refer to a stored one by its hash alone (never to one that is
// not stored); pruning drops the references and the sweep the manifests nobody refers to; a
// damaged one is DATA_LOSS naming it.
TEST_F(StoreTest, ManifestsAreStoredOncePerContent) {
  std::string manifest = "split,path,target\n";
  for (int i = 0; i < 20000; ++i) {
    absl::StrAppend(&manifest, i % 5 == 0 ? "valid" : "train", ",/data/birdclef-2021/train_short_audio/sp",
                    i % 300, "/XC", 20000000 + i * 7, ".ogg,", i % 300, "\n");
  }
  const std::string other = "split,path,target\nvalid,/a.ogg,0\n";
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto insert = [&](const std::string& job_id, const std::string& task_id, const TaskPayload& payload) {
    TaskRow task;
    task.info.set_task_id(task_id);
    task.info.set_job_id(job_id);
    return (*store)->Transaction([&] { return (*store)->InsertTask(task, payload); });
  };
  ASSERT_TRUE(insert("jaaaaaaaaaaaa", "jaaaaaaaaaaaa/pretrain-f0", TaskPayload{manifest, "seed: 1\n", ""}).ok());
  ASSERT_TRUE(insert("jaaaaaaaaaaaa", "jaaaaaaaaaaaa/finetune-f0", TaskPayload{other, "seed: 1\n", ""}).ok());
  // New content under another content's address is refused at insert (it was found out only at
  // a lease, as a FAILED task).
  const std::string third = "split,path,target\ntrain,/t/c.ogg,0\n";
  const absl::Status misnamed =
      insert("jaaaaaaaaaaaa", "jaaaaaaaaaaaa/finetune-f1", TaskPayload{third, "seed: 1\n", Sha256Hex("not it")});
  EXPECT_EQ(misnamed.code(), absl::StatusCode::kInvalidArgument) << misnamed;
  EXPECT_NE(misnamed.message().find("manifest hash " + Sha256Hex("not it") + " is not the SHA-256 of its " +
                                    std::to_string(third.size()) + " bytes (" + Sha256Hex(third) + ")"),
            std::string::npos)
      << misnamed;
  // The same content again, by its bytes and by its hash alone.
  ASSERT_TRUE(insert("jbbbbbbbbbbbb", "jbbbbbbbbbbbb/pretrain-f0", TaskPayload{manifest, "seed: 2\n", ""}).ok());
  ASSERT_TRUE(insert("jbbbbbbbbbbbb", "jbbbbbbbbbbbb/finetune-f0", TaskPayload{"", "seed: 2\n", Sha256Hex(other)}).ok());
  const absl::Status unknown = insert("jbbbbbbbbbbbb", "jbbbbbbbbbbbb/finetune-f1",
                                      TaskPayload{"", "seed: 2\n", Sha256Hex("never stored")});
  EXPECT_EQ(unknown.code(), absl::StatusCode::kFailedPrecondition) << unknown;
  EXPECT_NE(unknown.message().find("refers to manifest " + Sha256Hex("never stored") + ", which is not stored"),
            std::string::npos)
      << unknown;
  const absl::Status bad_hash = insert("jbbbbbbbbbbbb", "jbbbbbbbbbbbb/finetune-f2", TaskPayload{"", "", "XYZ"});
  EXPECT_EQ(bad_hash.code(), absl::StatusCode::kInvalidArgument) << bad_hash;

  auto stats = (*store)->GetManifestStats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->count, 2);
  EXPECT_LT(stats->stored_bytes, static_cast<int64_t>(manifest.size() / 5)) << manifest.size();
  auto payload = (*store)->LoadTaskPayload("jbbbbbbbbbbbb/pretrain-f0");
  ASSERT_TRUE(payload.ok()) << payload.status();
  EXPECT_EQ(payload->manifest_hash, Sha256Hex(manifest));
  EXPECT_EQ(payload->pipeline_yaml, "seed: 2\n");
  auto big = (*store)->LoadManifest(payload->manifest_hash);
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(*big, manifest);

  // Pruning job a leaves every manifest job b still refers to.
  int64_t points = 0, cleared = 0, swept = 0, swept_bytes = 0;
  ASSERT_TRUE((*store)->Transaction([&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR((*store)->PruneJob("jaaaaaaaaaaaa", &points, &cleared));
    return (*store)->SweepManifests(&swept, &swept_bytes);
  }).ok());
  EXPECT_EQ(cleared, 2);
  EXPECT_EQ(swept, 0);
  ASSERT_TRUE((*store)->LoadManifest(Sha256Hex(manifest)).ok());
  ASSERT_TRUE((*store)->Transaction([&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR((*store)->PruneJob("jbbbbbbbbbbbb", &points, &cleared));
    return (*store)->SweepManifests(&swept, &swept_bytes);
  }).ok());
  EXPECT_EQ(cleared, 4);
  EXPECT_EQ(swept, 2);
  EXPECT_EQ(swept_bytes, stats->stored_bytes);
  EXPECT_EQ((*store)->LoadManifest(Sha256Hex(manifest)).status().code(), absl::StatusCode::kNotFound);
  auto pruned = (*store)->LoadTaskPayload("jbbbbbbbbbbbb/pretrain-f0");
  ASSERT_TRUE(pruned.ok()) << pruned.status();
  EXPECT_EQ(pruned->manifest_hash, "");

  // A damaged manifest.
  ASSERT_TRUE(insert("jcccccccccccc", "jcccccccccccc/finetune-f0", TaskPayload{other, "", ""}).ok());
  ASSERT_TRUE((*store)->Close().ok());
  RawExec("UPDATE manifests SET data=x'41565a310a000000000000007801'");
  store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto damaged = (*store)->LoadManifest(Sha256Hex(other));
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(damaged.status().message().find("manifest " + Sha256Hex(other) + ": the stored manifest does not inflate"),
            std::string::npos)
      << damaged.status();
  // A header whose size field is damaged: 32 GiB claimed by 2 bytes is refused before anything
  // is allocated (it used to be, and ended the process with bad_alloc or the OOM killer).
  ASSERT_TRUE((*store)->Close().ok());
  RawExec("UPDATE manifests SET data=x'41565a310000000008000000' || x'7801'");
  store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  damaged = (*store)->LoadManifest(Sha256Hex(other));
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(damaged.status().message().find("claims 34359738368 bytes from 2 deflated (a damaged header)"),
            std::string::npos)
      << damaged.status();
  // Other bytes of the same size, whole and inflating: not the content its hash names.
  ASSERT_TRUE((*store)->Close().ok());
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    const std::string swapped = DeflateManifest(std::string(other.size(), 'x'));
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "UPDATE manifests SET data=?1", -1, &st, nullptr), SQLITE_OK);
    sqlite3_bind_blob(st, 1, swapped.data(), static_cast<int>(swapped.size()), SQLITE_TRANSIENT);
    EXPECT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    ASSERT_EQ(sqlite3_close(db), SQLITE_OK);
  }
  store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  damaged = (*store)->LoadManifest(Sha256Hex(other));
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(damaged.status().message().find(absl::StrCat("manifest ", Sha256Hex(other), ": the ", other.size(),
                                                         " bytes stored have SHA-256 ",
                                                         Sha256Hex(std::string(other.size(), 'x')))),
            std::string::npos)
      << damaged.status();
}

// A database of schema version 1 (each task held its own manifest) is migrated at Open: the
// manifests move into the content table, once per content; a row that does not inflate stays and
// is still DATA_LOSS naming the task; the migrated file (upgraded on to version 3) then opens.
TEST_F(StoreTest, MigratesAVersion1Database) {
  RawExec(
      "CREATE TABLE jobs (  job_id TEXT PRIMARY KEY,  seq INTEGER NOT NULL,  state INTEGER NOT NULL,  info BLOB NOT NULL);"
      "CREATE TABLE tasks (  task_id TEXT PRIMARY KEY,  job_id TEXT NOT NULL,  seq INTEGER NOT NULL,"
      "  state INTEGER NOT NULL,  group_id TEXT NOT NULL,  depends_on TEXT NOT NULL,  init_checkpoint TEXT NOT NULL,"
      "  resume_checkpoint TEXT NOT NULL,  info BLOB NOT NULL,  manifest_csv BLOB NOT NULL,  pipeline_yaml TEXT NOT NULL);"
      "CREATE INDEX tasks_by_job ON tasks(job_id, seq);"
      "CREATE TABLE groups (  group_id TEXT PRIMARY KEY,  task_id TEXT NOT NULL,  registered_unix_ms INTEGER NOT NULL,"
      "  info BLOB NOT NULL);"
      "CREATE TABLE metric_points (  id INTEGER PRIMARY KEY AUTOINCREMENT,  job_id TEXT NOT NULL,  task_id TEXT NOT NULL,"
      "  attempt INTEGER NOT NULL,  time_unix_ms INTEGER NOT NULL,  epoch INTEGER NOT NULL,  step INTEGER NOT NULL,"
      "  epoch_end INTEGER NOT NULL,  metrics BLOB NOT NULL);"
      "CREATE INDEX metric_points_by_job ON metric_points(job_id, epoch_end, id);"
      "CREATE INDEX metric_points_by_task ON metric_points(task_id, epoch_end, id);"
      "CREATE TABLE checkpoints (  id INTEGER PRIMARY KEY AUTOINCREMENT,  task_id TEXT NOT NULL,  attempt INTEGER NOT NULL,"
      "  path TEXT NOT NULL,  epoch INTEGER NOT NULL,  best INTEGER NOT NULL,  time_unix_ms INTEGER NOT NULL);"
      "CREATE INDEX checkpoints_by_task ON checkpoints(task_id, id);"
      "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
      "PRAGMA user_version=1;");
  const std::string csv = "split,path,target\nvalid,/a.ogg,0\n";
  RawExec("INSERT INTO tasks VALUES('jaaaaaaaaaaaa/finetune-f0', 'jaaaaaaaaaaaa', 0, 0, '', '', '', '', x'', "
          "'split,path,target\nvalid,/a.ogg,0\n', 'seed: 1\n')");
  RawExec("INSERT INTO tasks VALUES('jbbbbbbbbbbbb/finetune-f0', 'jbbbbbbbbbbbb', 0, 0, '', '', '', '', x'', "
          "'split,path,target\nvalid,/a.ogg,0\n', 'seed: 2\n')");
  RawExec("INSERT INTO tasks VALUES('jbbbbbbbbbbbb/finetune-f1', 'jbbbbbbbbbbbb', 1, 0, '', '', '', '', x'', "
          "x'41565a310a000000000000007801', 'seed: 2\n')");
  RawExec("INSERT INTO tasks VALUES('jbbbbbbbbbbbb/finetune-f2', 'jbbbbbbbbbbbb', 2, 0, '', '', '', '', x'', x'', '')");
  // What an upgrade killed during its copy left: the copy is made under its own name and renamed
  // once whole (a kill left a truncated file under the backup's name), and such a leftover goes.
  std::ofstream(path_ + ".v1.bak.partial") << "the first pages of a copy";
  for (int open = 0; open < 2; ++open) {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    auto stats = (*store)->GetManifestStats();
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(stats->count, 1);
    for (const char* task_id : {"jaaaaaaaaaaaa/finetune-f0", "jbbbbbbbbbbbb/finetune-f0"}) {
      auto payload = (*store)->LoadTaskPayload(task_id);
      ASSERT_TRUE(payload.ok()) << payload.status();
      EXPECT_EQ(payload->manifest_hash, Sha256Hex(csv)) << task_id;
      EXPECT_EQ(payload->manifest_csv, "") << task_id;
    }
    auto manifest = (*store)->LoadManifest(Sha256Hex(csv));
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    EXPECT_EQ(*manifest, csv);
    auto damaged = (*store)->LoadTaskPayload("jbbbbbbbbbbbb/finetune-f1");
    EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(damaged.status().message().find("task jbbbbbbbbbbbb/finetune-f1: the stored manifest does not inflate"),
              std::string::npos)
        << damaged.status();
    auto none = (*store)->LoadTaskPayload("jbbbbbbbbbbbb/finetune-f2");
    ASSERT_TRUE(none.ok()) << none.status();
    EXPECT_EQ(none->manifest_hash, "");
    // The upgrade is one way: the first open kept the version-1 file as it was, the second had
    // nothing to upgrade.
    EXPECT_EQ((*store)->upgraded_from(), open == 0 ? 1 : 0);
    EXPECT_EQ((*store)->upgrade_backup(), open == 0 ? path_ + ".v1.bak" : "");
    EXPECT_FALSE(fs::exists(path_ + ".v1.bak.partial"));
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open_v2((path_ + ".v1.bak").c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT (SELECT user_version FROM pragma_user_version), "
                                   "(SELECT count(*) FROM tasks WHERE length(manifest_csv) > 0)",
                               -1, &stmt, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(stmt, 0), 1);
  EXPECT_EQ(sqlite3_column_int(stmt, 1), 3);  // the manifests still in their rows
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

TEST_F(StoreTest, FailedTransactionLeavesNothing) {
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  JobRow job;
  job.seq = 1;
  job.info.set_job_id("j0123456789ab");
  const absl::Status status = (*store)->Transaction([&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR((*store)->PutJob(job));
    return absl::InternalError("injected");
  });
  EXPECT_EQ(status.message(), "injected");
  auto jobs = (*store)->LoadJobs();
  ASSERT_TRUE(jobs.ok());
  EXPECT_TRUE(jobs->empty());
  // A constraint violation is reported with the statement and the path, and rolled back.
  TaskRow task;
  task.info.set_task_id("j0123456789ab/pretrain-f0");
  const absl::Status twice = (*store)->Transaction([&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR((*store)->InsertTask(task, {}));
    return (*store)->InsertTask(task, {});
  });
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.message().find("INSERT INTO tasks"), std::string::npos) << twice;
  EXPECT_NE(twice.message().find(path_), std::string::npos) << twice;
  auto tasks = (*store)->LoadTasks();
  ASSERT_TRUE(tasks.ok());
  EXPECT_TRUE(tasks->empty());
  // Updating a task that does not exist is an error, not a silent no-op.
  EXPECT_FALSE((*store)->Transaction([&] { return (*store)->UpdateTask(task); }).ok());
}

// The fold cache's dataset versions (schema 3): recorded with their manifests, read back after a
// reopen, bounded to the most recent, refused when they name a manifest that is not stored, and
// dropped by the sweep that deletes a manifest they name.
TEST_F(StoreTest, DatasetVersionsSurviveReopenAndNeverNameAPrunedManifest) {
  const std::string pool = "split,path,target\ntrain,/p/a.ogg,0\n";
  const std::string target = "split,path,target\nvalid,/t/b.ogg,0\n";
  auto version = [&](const std::string& key, int64_t created) {
    DatasetVersionRow row;
    row.key = key;
    row.created_unix_ms = created;
    row.stamps = "1 2 3 4 5 6 /data/xc\\n\n";
    row.manifests = {{0, Sha256Hex(pool), static_cast<int64_t>(pool.size())},
                     {3, Sha256Hex(target), static_cast<int64_t>(target.size())}};
    return row;
  };
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    const absl::Status missing = (*store)->PutDatasetVersion(version("k1", 1), 2);
    EXPECT_EQ(missing.code(), absl::StatusCode::kFailedPrecondition) << missing;
    EXPECT_NE(missing.message().find("refers to manifest " + Sha256Hex(pool) + ", which is not stored"),
              std::string::npos)
        << missing;
    auto nothing = (*store)->LoadDatasetVersion("k1");
    ASSERT_TRUE(nothing.ok()) << nothing.status();
    EXPECT_FALSE(nothing->has_value());  // the refused version left no row
    TaskRow a, b;
    a.info.set_task_id("jaaaaaaaaaaaa/pretrain-f0");
    a.info.set_job_id("jaaaaaaaaaaaa");
    b.info.set_task_id("jbbbbbbbbbbbb/finetune-f3");
    b.info.set_job_id("jbbbbbbbbbbbb");
    ASSERT_TRUE((*store)->Transaction([&]() -> absl::Status {
      AVIARY_RETURN_IF_ERROR((*store)->InsertTask(a, TaskPayload{pool, "", ""}, DeflateManifest(pool)));
      AVIARY_RETURN_IF_ERROR((*store)->InsertTask(b, TaskPayload{target, "", ""}));
      return (*store)->PutDatasetVersion(version("k1", 10), 2);
    }).ok());
    ASSERT_TRUE((*store)->PutDatasetVersion(version("k2", 20), 2).ok());
    ASSERT_TRUE((*store)->PutDatasetVersion(version("k1", 30), 2).ok());  // replaces k1
    auto pooled = (*store)->LoadManifest(Sha256Hex(pool));  // stored from its deflated bytes
    ASSERT_TRUE(pooled.ok()) << pooled.status();
    EXPECT_EQ(*pooled, pool);
  }
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto k1 = (*store)->LoadDatasetVersion("k1");
  ASSERT_TRUE(k1.ok()) << k1.status();
  ASSERT_TRUE(k1->has_value());
  EXPECT_EQ((*k1)->created_unix_ms, 30);
  EXPECT_EQ((*k1)->stamps, version("k1", 30).stamps);
  ASSERT_EQ((*k1)->manifests.size(), 2u);
  EXPECT_EQ((*k1)->manifests[0].fold, 0);
  EXPECT_EQ((*k1)->manifests[0].hash, Sha256Hex(pool));
  EXPECT_EQ((*k1)->manifests[1].fold, 3);
  EXPECT_EQ((*k1)->manifests[1].size, static_cast<int64_t>(target.size()));
  // Two kept: a third pushes out the oldest recorded (k2, 20).
  ASSERT_TRUE((*store)->PutDatasetVersion(version("k3", 40), 2).ok());
  EXPECT_FALSE((*store)->LoadDatasetVersion("k2")->has_value());
  EXPECT_TRUE((*store)->LoadDatasetVersion("k1")->has_value());
  EXPECT_TRUE((*store)->LoadDatasetVersion("k3")->has_value());
  // A lookup that found an older copy of k3 stale deletes only that copy: a rebuilt k3 (other
  // stamps) stays, the stale one goes.
  ASSERT_TRUE((*store)->DeleteDatasetVersionIfStamps("k3", "1 2 3 4 5 7 /data/xc\\n\n").ok());
  EXPECT_TRUE((*store)->LoadDatasetVersion("k3")->has_value());
  ASSERT_TRUE((*store)->DeleteDatasetVersionIfStamps("k3", version("k3", 40).stamps).ok());
  EXPECT_FALSE((*store)->LoadDatasetVersion("k3")->has_value());
  ASSERT_TRUE((*store)->DeleteDatasetVersionIfStamps("k3", version("k3", 40).stamps).ok());  // gone: no error
  ASSERT_TRUE((*store)->PutDatasetVersion(version("k3", 40), 2).ok());
  // "The most recent" is the order recorded, not the wall clock's: after the clock stepped back a
  // version recorded now stays, and the one recorded first (k1) goes.
  ASSERT_TRUE((*store)->PutDatasetVersion(version("k4", 25), 2).ok());
  EXPECT_TRUE((*store)->LoadDatasetVersion("k4")->has_value());
  EXPECT_TRUE((*store)->LoadDatasetVersion("k3")->has_value());
  EXPECT_FALSE((*store)->LoadDatasetVersion("k1")->has_value());
  // Pruning job b (the target's manifest) sweeps the manifest and both versions naming it.
  int64_t points = 0, cleared = 0, swept = 0, bytes = 0;
  ASSERT_TRUE((*store)->Transaction([&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR((*store)->PruneJob("jbbbbbbbbbbbb", &points, &cleared));
    return (*store)->SweepManifests(&swept, &bytes);
  }).ok());
  EXPECT_EQ(swept, 1);
  EXPECT_FALSE((*store)->LoadDatasetVersion("k1")->has_value());
  EXPECT_FALSE((*store)->LoadDatasetVersion("k3")->has_value());
  EXPECT_FALSE((*store)->LoadDatasetVersion("k4")->has_value());
  EXPECT_TRUE((*store)->LoadManifest(Sha256Hex(pool)).ok());  // job a still refers to it
  // max_versions 0 keeps the version just written (OFFSET 0 chose every row, it too).
  DatasetVersionRow only_pool = version("k6", 50);
  only_pool.manifests.resize(1);
  ASSERT_TRUE((*store)->PutDatasetVersion(only_pool, 0).ok());
  EXPECT_TRUE((*store)->LoadDatasetVersion("k6")->has_value());
  ASSERT_TRUE((*store)->Close().ok());
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT (SELECT count(*) FROM dataset_versions) + "
                                   "(SELECT count(*) FROM dataset_version_manifests)", -1, &stmt, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(stmt, 0), 2);  // k6 and its one manifest
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

// Another program holding the database's write lock past the busy timeout (an sqlite3 shell in
// a transaction) is UNAVAILABLE, which a client retries, not INTERNAL; the store works once the
// lock is let go.
TEST_F(StoreTest, AnotherProgramsLockIsUnavailable) {
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), SQLITE_OK);
  const absl::Status busy = (*store)->Transaction([] { return absl::OkStatus(); });
  EXPECT_EQ(busy.code(), absl::StatusCode::kUnavailable) << busy;
  EXPECT_NE(busy.message().find("another program holds the database's lock"), std::string::npos) << busy;
  ASSERT_EQ(sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_close(db), SQLITE_OK);
  EXPECT_TRUE((*store)->Transaction([] { return absl::OkStatus(); }).ok());
}

// A version-2 file (before the dataset versions) gains their tables at Open and keeps its rows.
TEST_F(StoreTest, MigratesSchemaVersion2) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    TaskRow task;
    task.info.set_task_id("jaaaaaaaaaaaa/pretrain-f0");
    task.info.set_job_id("jaaaaaaaaaaaa");
    ASSERT_TRUE((*store)->Transaction([&] { return (*store)->InsertTask(task, TaskPayload{"a,b\n", "", ""}); }).ok());
  }
  RawExec("DROP TABLE dataset_version_manifests; DROP TABLE dataset_versions; PRAGMA user_version=2;");
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_TRUE((*store)->LoadManifest(Sha256Hex("a,b\n")).ok());
  auto none = (*store)->LoadDatasetVersion("k");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
  ASSERT_TRUE((*store)->Close().ok());
  store = Store::Open(path_);  // the migrated file verifies as version 3
  ASSERT_TRUE(store.ok()) << store.status();
}

// A version-2 file that would not verify as version 3 after the migration (an index added by
// hand) is refused naming it, and stays version 2 (it was migrated, then refused: neither
// coordinator could open it).
TEST_F(StoreTest, AMigrationThatDoesNotVerifyLeavesTheFileAsItWas) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
  }
  RawExec("DROP TABLE dataset_version_manifests; DROP TABLE dataset_versions; PRAGMA user_version=2; "
          "CREATE INDEX by_hand ON jobs(state)");
  auto store = Store::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("unexpected index by_hand"), std::string::npos) << store.status();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT (SELECT user_version FROM pragma_user_version), "
                                   "(SELECT count(*) FROM sqlite_master WHERE name='dataset_versions')",
                               -1, &stmt, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(stmt, 0), 2);
  EXPECT_EQ(sqlite3_column_int(stmt, 1), 0);  // the migration rolled back
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

TEST_F(StoreTest, UsesWalAndFullSync) {
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &stmt, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0))), "wal");
  sqlite3_finalize(stmt);
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &stmt, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(stmt, 0), kStoreSchemaVersion);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

TEST_F(StoreTest, RefusesAnotherSchemaVersion) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
  }
  RawExec("PRAGMA user_version=99");
  auto store = Store::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(store.status().message().find("schema version 99"), std::string::npos) << store.status();
  EXPECT_NE(store.status().message().find(path_), std::string::npos) << store.status();
}

// A database of the right version whose tables were changed is refused at start, naming the
// table or index (issue 14, item 6), not at the first write to it.
TEST_F(StoreTest, RefusesADamagedSchemaNamingWhatDiffers) {
  auto expect_refused = [this](const std::string& want) {
    auto store = Store::Open(path_);
    ASSERT_FALSE(store.ok()) << want;
    EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(store.status().message().find(want), std::string::npos) << store.status();
    EXPECT_NE(store.status().message().find(path_), std::string::npos) << store.status();
  };
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
  }
  RawExec("DROP INDEX checkpoints_by_task");
  expect_refused("index checkpoints_by_task is missing");
  RawExec("DROP TABLE checkpoints");
  expect_refused("table checkpoints is missing");
  fs::remove_all(root_);
  fs::create_directories(root_);
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
  }
  RawExec("ALTER TABLE groups ADD COLUMN extra INTEGER");
  expect_refused("table groups is `");
  fs::remove_all(root_);
  fs::create_directories(root_);
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
  }
  RawExec("CREATE TABLE stray(x INTEGER)");
  expect_refused("unexpected table stray");
}

TEST_F(StoreTest, RefusesAForeignDatabase) {
  RawExec("CREATE TABLE other(x INTEGER)");
  auto store = Store::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(store.status().message().find("not an aviary database"), std::string::npos)
      << store.status();
  // Left as it was: still a rollback-journal file (header bytes 18 and 19 are 1; WAL makes them 2).
  std::ifstream in(path_, std::ios::binary);
  char header[20] = {};
  ASSERT_TRUE(in.read(header, sizeof(header)));
  EXPECT_EQ(header[18], 1);
  EXPECT_EQ(header[19], 1);
  EXPECT_FALSE(fs::exists(path_ + "-wal"));
}

// A file of views only (no table) is not empty either; nor does a stray table escape the
// schema check by a name LIKE 'sqlite_%' matches ('_' is LIKE's any-character).
TEST_F(StoreTest, RefusesAFileOfViewsAndATableNamedLikeSqlites) {
  RawExec("CREATE VIEW v AS SELECT 1");
  auto store = Store::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("1 schema objects"), std::string::npos) << store.status();
  fs::remove_all(root_);
  fs::create_directories(root_);
  {
    auto fresh = Store::Open(path_);
    ASSERT_TRUE(fresh.ok()) << fresh.status();
  }
  RawExec("CREATE TABLE sqliteXstray(x INTEGER)");
  auto stray = Store::Open(path_);
  ASSERT_FALSE(stray.ok());
  EXPECT_NE(stray.status().message().find("unexpected table sqliteXstray"), std::string::npos) << stray.status();
}

// A version 2 file that fails its upgrade (an index added by hand: the upgraded schema is not
// version 3's) stays version 2 and keeps no copy: a coordinator restarted on it again and again
// made a full copy each time.
TEST_F(StoreTest, AFailedUpgradeKeepsNoCopy) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
  }
  RawExec("DROP TABLE dataset_version_manifests; DROP TABLE dataset_versions; PRAGMA user_version=2; "
          "CREATE INDEX stray ON jobs(seq);");
  for (int start = 0; start < 2; ++start) {
    auto store = Store::Open(path_);
    ASSERT_FALSE(store.ok());
    EXPECT_NE(store.status().message().find("unexpected index stray"), std::string::npos) << store.status();
    EXPECT_FALSE(fs::exists(path_ + ".v2.bak")) << start;
    EXPECT_FALSE(fs::exists(path_ + ".v2.2.bak")) << start;
  }
}

// Another program's SQLite file with a user_version of its own, or a newer coordinator's file
// still in rollback mode (a VACUUM INTO copy), is refused before anything is written to it:
// the journal mode used to be switched to WAL first.
TEST_F(StoreTest, RefusesAVersionedForeignOrNewerFileWithoutChangingIt) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"PRAGMA user_version=7", "schema version 7 (PRAGMA user_version); this coordinator reads versions 1 to 3"},
      {"PRAGMA user_version=1", "has schema version 1 but no table checkpoints of that version: not an aviary database"},
      {"PRAGMA user_version=2", "has schema version 2 but no table checkpoints of that version"},
      {"PRAGMA user_version=3", "table checkpoints is missing"},
  };
  for (const auto& [pragma, want] : cases) {
    fs::remove_all(root_);
    fs::create_directories(root_);
    RawExec("CREATE TABLE t(x INTEGER); " + pragma);
    std::ifstream before_in(path_, std::ios::binary);
    const std::string before((std::istreambuf_iterator<char>(before_in)), std::istreambuf_iterator<char>());
    auto store = Store::Open(path_);
    ASSERT_FALSE(store.ok()) << pragma;
    EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
    EXPECT_NE(store.status().message().find(want), std::string::npos) << store.status();
    EXPECT_NE(store.status().message().find(path_), std::string::npos) << store.status();
    std::ifstream after_in(path_, std::ios::binary);
    const std::string after((std::istreambuf_iterator<char>(after_in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(after, before) << pragma << ": the file was changed";
    EXPECT_FALSE(fs::exists(path_ + "-wal")) << pragma;
    EXPECT_FALSE(fs::exists(path_ + ".v1.bak")) << pragma;
  }
}

// A database file this process cannot write (a backup restored by root into the folder of a
// service that runs as another user) is refused at Open, naming it: SQLite opened it read-only
// and every write after the start failed. As root (CI), the open runs as nobody in a child.
TEST_F(StoreTest, RefusesAReadOnlyDatabaseAtOpen) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
  }
  ASSERT_EQ(::chmod(path_.c_str(), 0444), 0);
  ASSERT_EQ(::chmod((path_ + ".lock").c_str(), 0666), 0);
  ASSERT_EQ(::chmod(root_.c_str(), 0755), 0);
  const bool root = ::geteuid() == 0;
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        if (root && (::setgid(65534) != 0 || ::setuid(65534) != 0)) std::_Exit(2);
        auto store = Store::Open(path_);
        if (store.ok()) std::_Exit(1);
        std::fprintf(stderr, "%s\n", std::string(store.status().ToString()).c_str());
        std::_Exit(store.status().code() == absl::StatusCode::kFailedPrecondition ? 3 : 4);
      },
      ::testing::ExitedWithCode(3), "is read-only for this coordinator \\(uid [0-9]+; the file: owner uid [0-9]+, mode 0444\\)");
}

// A writable file in a folder this user cannot write (root's, say) opened, and the first write
// failed "attempt to write a readonly database" (SQLite creates and removes the -wal there).
TEST_F(StoreTest, RefusesADatabaseInAFolderItCannotWrite) {
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
  }
  ASSERT_EQ(::chmod(path_.c_str(), 0666), 0);
  ASSERT_EQ(::chmod((path_ + ".lock").c_str(), 0666), 0);
  ASSERT_EQ(::chmod(root_.c_str(), 0555), 0);
  const bool root = ::geteuid() == 0;
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        if (root && (::setgid(65534) != 0 || ::setuid(65534) != 0)) std::_Exit(2);
        auto store = Store::Open(path_);
        if (store.ok()) std::_Exit(1);
        std::fprintf(stderr, "%s\n", std::string(store.status().ToString()).c_str());
        std::_Exit(store.status().code() == absl::StatusCode::kFailedPrecondition ? 3 : 4);
      },
      ::testing::ExitedWithCode(3), "its folder .* is not writable for this coordinator \\(uid [0-9]+; ");
  ASSERT_EQ(::chmod(root_.c_str(), 0755), 0);
}

// A COMMIT that fails in its I/O may be on disk all the same (its WAL frames replayed at the next
// open): the store refuses everything after it, saying a restart must read the file back, rather
// than report a rollback the caller would retry (a second copy of a job after the restart). The
// failure here: the WAL's writes past a file-size limit (EFBIG, SQLITE_IOERR_WRITE), in a child.
// The child's side: exits 7 when the failed COMMIT broke the store, another code otherwise.
[[noreturn]] void CommitPastAFileSizeLimit(const std::string& path) {
  auto store = Store::Open(path);
  if (!store.ok()) std::_Exit(2);
  int told = 0;  // SetOnBroken's calls: once
  (*store)->SetOnBroken([&told](const absl::Status& why) {
    ++told;
    std::fprintf(stderr, "broken: %s\n", std::string(why.ToString()).c_str());
  });
  std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit limit;
  limit.rlim_cur = limit.rlim_max = 256 * 1024;
  if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) std::_Exit(3);
  // 2 MB of random letters (stored deflated, still over a MB of pages into the WAL at COMMIT).
  std::mt19937 rng(7);
  std::string csv(2 << 20, 'x');
  for (char& c : csv) c = static_cast<char>('a' + rng() % 26);
  const absl::Status failed = (*store)->Transaction([&] { return (*store)->PutManifest(Sha256Hex(csv), csv); });
  std::fprintf(stderr, "first: %s\n", std::string(failed.ToString()).c_str());
  if (failed.ok()) std::_Exit(4);
  const absl::Status after = (*store)->Transaction([&] { return (*store)->PutManifest(Sha256Hex("a"), "a"); });
  std::fprintf(stderr, "after: %s\n", std::string(after.ToString()).c_str());
  std::_Exit(after.ok() ? 5 : told == 1 ? 7 : 8);
}

TEST_F(StoreTest, ACommitThatFailsInItsIoBreaksTheStore) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(CommitPastAFileSizeLimit(path_), ::testing::ExitedWithCode(7),
      "broken: INTERNAL: database .*: a COMMIT failed with an I/O error(.|\n)*"
      "first: INTERNAL: database .*: a COMMIT failed with an I/O error .*whether it reached the disk is unknown: "
      "the coordinator must be restarted(.|\n)*after: INTERNAL: database .*: a COMMIT failed with an I/O error");
}

// A damaged page (a bad sector under a manifest's overflow pages) reads the same way again: it
// is DATA_LOSS, which the scheduler takes for permanent (the lease fails its task), not INTERNAL,
// which a group retried for ever on the same task.
TEST_F(StoreTest, ADamagedPageIsDataLossNamingTheFile) {
  std::mt19937 rng(11);
  std::string csv(64 * 1024, 'x');  // random letters: some 40 KB deflated, a chain of overflow pages
  for (char& c : csv) c = static_cast<char>('a' + rng() % 26);
  const std::string hash = Sha256Hex(csv);
  {
    auto store = Store::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    ASSERT_TRUE((*store)->Transaction([&] { return (*store)->PutManifest(hash, csv); }).ok());
    ASSERT_TRUE((*store)->Close().ok());  // checkpointed into the file
  }
  // The last pages of the file are the manifest's (the newest row): garbage over three of them.
  const uintmax_t size = fs::file_size(path_);
  ASSERT_GT(size, 4u * 4096);
  {
    std::fstream file(path_, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(size - 3 * 4096));
    const std::string garbage(3 * 4096, '\xff');
    file.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
    ASSERT_TRUE(file.good());
  }
  auto store = Store::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto loaded = (*store)->LoadManifest(hash);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss) << loaded.status();
  EXPECT_NE(loaded.status().message().find(path_), std::string::npos) << loaded.status();
  EXPECT_NE(loaded.status().message().find("restore it from a backup"), std::string::npos) << loaded.status();
}

TEST_F(StoreTest, OneStorePerDatabase) {
  auto first = Store::Open(path_);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = Store::Open(path_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);  // a restart waits for it (exit 1)
  EXPECT_NE(second.status().message().find("in use by another coordinator"), std::string::npos)
      << second.status();
  // The same file by another name (a symlink, "..") is the same database.
  fs::create_directories(root_ + "/sub");
  fs::create_symlink(path_, root_ + "/alias.db");
  for (const std::string& other : {root_ + "/alias.db", root_ + "/sub/../aviary.db"}) {
    auto aliased = Store::Open(other);
    ASSERT_FALSE(aliased.ok()) << other;
    EXPECT_NE(aliased.status().message().find("in use by another coordinator"), std::string::npos)
        << aliased.status();
  }
  ASSERT_TRUE((*first)->Close().ok());
  auto third = Store::Open(path_);
  EXPECT_TRUE(third.ok()) << third.status();
}

// A folder that is not there (a typo; a share not mounted) and a folder named as the database
// are the user's to fix: FAILED_PRECONDITION (exit 2, which systemd does not restart every few
// seconds in vain), naming the path and the cause. They were INTERNAL (exit 1), the folder's
// "unable to open database file: unable to open database file".
TEST_F(StoreTest, UnopenableFileNamesThePath) {
  auto store = Store::Open(root_ + "/missing/dir/aviary.db");
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
  EXPECT_NE(store.status().message().find(root_ + "/missing/dir/aviary.db"), std::string::npos)
      << store.status();
  EXPECT_NE(store.status().message().find("its folder " + root_ + "/missing/dir is not there"), std::string::npos)
      << store.status();
  ASSERT_EQ(::mkdir((root_ + "/a.db").c_str(), 0755), 0);
  auto folder = Store::Open(root_ + "/a.db");
  ASSERT_FALSE(folder.ok());
  EXPECT_EQ(folder.status().code(), absl::StatusCode::kFailedPrecondition) << folder.status();
  EXPECT_NE(folder.status().message().find(root_ + "/a.db: a folder, not a database file"), std::string::npos)
      << folder.status();
  EXPECT_NE(::access((root_ + "/a.db.lock").c_str(), F_OK), 0);  // nothing created beside it
}

}  // namespace
}  // namespace aviary::coordinator
