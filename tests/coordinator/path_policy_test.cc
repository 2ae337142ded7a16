#include "coordinator/path_policy.h"

#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;

class PathPolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat("/tmp/aviary_paths_", ::getpid(), "_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = fs::canonical(tmpl).string();
    fs::create_directories(root_ + "/data/a");
    fs::create_directories(root_ + "/data2");
    fs::create_symlink("/etc", root_ + "/data/etc");
    std::ofstream(root_ + "/data/a/file") << "x";
  }
  void TearDown() override { fs::remove_all(root_); }
  std::string root_;
};

TEST_F(PathPolicyTest, InsideIsComponentWise) {
  EXPECT_TRUE(PathIsInside("/data", "/data"));
  EXPECT_TRUE(PathIsInside("/data/x/y", "/data"));
  EXPECT_TRUE(PathIsInside("/data/x", "/data/"));
  EXPECT_TRUE(PathIsInside("/anything", "/"));
  EXPECT_FALSE(PathIsInside("/data2", "/data"));
  EXPECT_FALSE(PathIsInside("/dat", "/data"));
  EXPECT_FALSE(PathIsInside("/", "/data"));
}

TEST_F(PathPolicyTest, ResolvesSymlinksAndPathsThatDoNotExistYet) {
  auto resolved = ResolvePolicyPath("key 'k'", root_ + "/data/a/file");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, root_ + "/data/a/file");
  resolved = ResolvePolicyPath("key 'k'", root_ + "/data/etc/passwd");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, "/etc/passwd");
  resolved = ResolvePolicyPath("key 'k'", root_ + "/data/new/cache/./dir");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, root_ + "/data/new/cache/dir");
  resolved = ResolvePolicyPath("key 'k'", root_ + "/data/etc/new-dir");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, "/etc/new-dir");
  // '..' in the part that does not exist is refused; in the existing part realpath handles it.
  resolved = ResolvePolicyPath("key 'k'", root_ + "/data/new/../../data2");
  ASSERT_FALSE(resolved.ok());
  EXPECT_NE(resolved.status().message().find("key 'k': '" + root_ + "/data/new/../../data2': '..' after"),
            std::string::npos)
      << resolved.status();
  resolved = ResolvePolicyPath("key 'k'", root_ + "/data/a/../../data2");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, root_ + "/data2");
  EXPECT_FALSE(ResolvePolicyPath("key 'k'", "relative/path").ok());
}

TEST_F(PathPolicyTest, FollowsALinkToWhatDoesNotExistYet) {
  // A dangling link inside a root is what its target will be, not a new folder of the root (the
  // workers write through it): data/later -> data2/notyet, data/rel -> ../data2/x/y (relative).
  fs::create_symlink(root_ + "/data2/notyet", root_ + "/data/later");
  fs::create_symlink("../data2/x/y", root_ + "/data/rel");
  auto resolved = ResolvePolicyPath("key 'k'", root_ + "/data/later/cache");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, root_ + "/data2/notyet/cache");
  resolved = ResolvePolicyPath("key 'k'", root_ + "/data/later");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, root_ + "/data2/notyet");
  resolved = ResolvePolicyPath("key 'k'", root_ + "/data/rel/z");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, root_ + "/data2/x/y/z");
  EXPECT_FALSE(CheckDataPath("data.cache_dir", root_ + "/data/later/cache", {root_ + "/data"}).ok());
  EXPECT_TRUE(CheckDataPath("data.cache_dir", root_ + "/data/later/cache", {root_ + "/data2"}).ok());
  // A link to itself (a loop) is refused, named.
  fs::create_symlink(root_ + "/data/loop", root_ + "/data/loop");
  resolved = ResolvePolicyPath("key 'k'", root_ + "/data/loop/x");
  ASSERT_FALSE(resolved.ok());
  EXPECT_NE(resolved.status().message().find("key 'k': '" + root_ + "/data/loop/x': "), std::string::npos)
      << resolved.status();
}

TEST_F(PathPolicyTest, OnlyErrorsThatSayNothingAboutTheFileAreTransient) {
  for (int err : {EIO, ESTALE, ETIMEDOUT, EINTR, EMFILE}) EXPECT_TRUE(TransientFilesystemErrno(err)) << err;
  for (int err : {ENOENT, ENOTDIR, EACCES, ELOOP, 0}) EXPECT_FALSE(TransientFilesystemErrno(err)) << err;
}

TEST_F(PathPolicyTest, DataPathsAndCheckpoints) {
  auto roots = ResolveDataRoots("data_roots", {root_ + "/data"});
  ASSERT_TRUE(roots.ok()) << roots.status();
  EXPECT_TRUE(CheckDataPath("data.cache_dir", root_ + "/data/a/new", *roots).ok());
  EXPECT_TRUE(CheckDataPath("data.cache_dir", "", *roots).ok());
  const absl::Status outside = CheckDataPath("data.cache_dir", root_ + "/data2/x", *roots);
  EXPECT_EQ(outside.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(outside.message(), absl::StrCat("key 'data.cache_dir': '", root_, "/data2/x' resolves to '", root_,
                                            "/data2/x', outside the data roots (", root_,
                                            "/data): jobs read and write only inside the coordinator's data_roots "
                                            "(its config)"));
  EXPECT_FALSE(CheckDataPath("model.pretrained_weights", root_ + "/data/etc/shadow", *roots).ok());
  EXPECT_NE(CheckDataPath("data.cache_dir", root_ + "/data/a", {}).message().find("set `data_roots`"),
            std::string::npos);
  EXPECT_FALSE(ResolveDataRoots("data_roots", {root_ + "/data/a/file"}).ok());
  EXPECT_FALSE(ResolveDataRoots("data_roots", {root_ + "/missing"}).ok());

  EXPECT_TRUE(CheckCheckpointPath("path", root_ + "/data/a/file", root_ + "/data/a").ok());
  EXPECT_TRUE(CheckCheckpointPath("path", root_ + "/data/a/file", root_ + "/data").ok());
  EXPECT_FALSE(CheckCheckpointPath("path", root_ + "/data/a/file", root_ + "/data2").ok());
  EXPECT_FALSE(CheckCheckpointPath("path", root_ + "/data/a/missing", root_ + "/data/a").ok());
  EXPECT_FALSE(CheckCheckpointPath("path", root_ + "/data/a", root_ + "/data").ok());  // a folder
  EXPECT_FALSE(CheckCheckpointPath("path", root_ + "/data/etc/passwd", root_ + "/data").ok());
}

// A group writes the run folders: one it replaced by a symbolic link (to /etc) moved the
// boundary with it, and /etc/passwd passed as a task's best checkpoint; a link below the run
// folder could be pointed elsewhere after the check.
TEST_F(PathPolicyTest, CheckpointsGoThroughNoSymbolicLink) {
  const std::string work = root_ + "/work";
  fs::create_directories(work + "/j1/a-fold0");
  fs::create_directories(work + "/j1/real");
  std::ofstream(work + "/j1/a-fold0/last.pt") << "x";
  std::ofstream(work + "/j1/real/last.pt") << "x";
  EXPECT_TRUE(CheckCheckpointPath("path", work + "/j1/a-fold0/last.pt", work + "/j1/a-fold0", work).ok());
  EXPECT_TRUE(CheckCheckpointPath("path", work + "//j1/a-fold0/./last.pt", work + "/j1/a-fold0/", work).ok());
  // Named through another path that resolves into the run folder.
  fs::create_symlink(work + "/j1/a-fold0", root_ + "/alias");
  absl::Status st = CheckCheckpointPath("path", root_ + "/alias/last.pt", work + "/j1/a-fold0", work);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("is not inside the task's run folder"), std::string::npos) << st;
  // A link below the run folder, even to a file inside it.
  fs::create_symlink(work + "/j1/a-fold0/last.pt", work + "/j1/a-fold0/link.pt");
  st = CheckCheckpointPath("path", work + "/j1/a-fold0/link.pt", work + "/j1/a-fold0", work);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("through a symbolic link"), std::string::npos) << st;
  // The run folder replaced by a link: to /etc, or to another folder under work_dir.
  fs::create_symlink("/etc", work + "/j1/b-fold0");
  st = CheckCheckpointPath("best_checkpoint", "/etc/passwd", work + "/j1/b-fold0", work);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  st = CheckCheckpointPath("best_checkpoint", work + "/j1/b-fold0/passwd", work + "/j1/b-fold0", work);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("a symbolic link stands in its path"), std::string::npos) << st;
  fs::create_symlink(work + "/j1/real", work + "/j1/c-fold0");
  st = CheckCheckpointPath("path", work + "/j1/c-fold0/last.pt", work + "/j1/c-fold0", work);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("a symbolic link stands in its path"), std::string::npos) << st;
  // work_dir itself may be a link (the operator's): the folders below it are checked.
  fs::create_symlink(work, root_ + "/work-link");
  EXPECT_TRUE(
      CheckCheckpointPath("path", root_ + "/work-link/j1/a-fold0/last.pt", root_ + "/work-link/j1/a-fold0",
                          root_ + "/work-link")
          .ok());
  EXPECT_FALSE(CheckCheckpointPath("path", root_ + "/work-link/j1/c-fold0/last.pt", root_ + "/work-link/j1/c-fold0",
                                   root_ + "/work-link")
                   .ok());
}

}  // namespace
}  // namespace aviary::coordinator
