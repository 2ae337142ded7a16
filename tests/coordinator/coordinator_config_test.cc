#include "coordinator/coordinator_config.h"

#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;

class CoordinatorConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat("/tmp/aviary_ccfg_", ::getpid(), "_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { fs::remove_all(root_); }
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = root_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }
  std::string root_;
};

TEST_F(CoordinatorConfigTest, TheShippedFileLoads) {
  // configs/coordinator.yaml names token files next to it; give it ones through flags.
  const std::string token = Write("token", "s3cret\n");
  const std::string worker_token = Write("worker.token", "w0rker\n");
  auto config = LoadCoordinatorConfig(AVIARY_SOURCE_DIR "/configs/coordinator.yaml",
                                      {{"token_file", token, "--token-file " + token},
                                       {"worker_token_file", worker_token, "--worker-token-file " + worker_token}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->listen, "0.0.0.0:7070");
  EXPECT_EQ(config->metrics_listen, "0.0.0.0:9470");
  EXPECT_EQ(config->database, AVIARY_SOURCE_DIR "/configs/aviary.db");
  EXPECT_EQ(config->heartbeat_timeout_s, 20);
  EXPECT_EQ(config->max_restarts, 3);
  EXPECT_EQ(config->token_file, token);
  EXPECT_EQ(config->worker_token_file, worker_token);
  EXPECT_EQ(config->viewer_token_file, "");
  EXPECT_EQ(config->tls_client_ca_file, "");
}

// data_roots: a YAML list (relative to the file's folder) or comma-separated from --set; each
// resolved with realpath and required to be an existing folder.
TEST_F(CoordinatorConfigTest, DataRootsAreResolvedExistingFolders) {
  fs::create_directories(root_ + "/data/a");
  fs::create_directories(root_ + "/b");
  fs::create_symlink(root_ + "/b", root_ + "/b-link");
  const std::string real = fs::canonical(root_).string();
  const std::string path = Write("c.yaml", "allow_no_auth: true\ndata_roots: [data/a, " + root_ + "/b-link]\n");
  auto config = LoadCoordinatorConfig(path, {});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->data_roots, (std::vector<std::string>{real + "/data/a", real + "/b"}));
  // --set: comma-separated.
  auto set = ParseSetOverride("data_roots=" + root_ + "/b, " + root_ + "/data");
  ASSERT_TRUE(set.ok()) << set.status();
  config = LoadCoordinatorConfig(path, {*set});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->data_roots, (std::vector<std::string>{real + "/b", real + "/data"}));
  // The default: none.
  config = LoadCoordinatorConfig(Write("d.yaml", "allow_no_auth: true\n"), {});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->data_roots.empty());
  // A missing folder and a file are refused, naming the line, the key and the path.
  config = LoadCoordinatorConfig(Write("e.yaml", "allow_no_auth: true\ndata_roots:\n  - missing\n"), {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(config.status().message().find(root_ + "/e.yaml:3: key 'data_roots' [0]: '" + root_ +
                                           "/missing': No such file or directory"),
            std::string::npos)
      << config.status();
  Write("file", "x");
  config = LoadCoordinatorConfig(path, {{"data_roots", root_ + "/file", "--set data_roots=" + root_ + "/file"}});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("--set data_roots=" + root_ + "/file: key 'data_roots' [0]: '" +
                                           root_ + "/file' (" + real + "/file) is not a folder"),
            std::string::npos)
      << config.status();
}

TEST_F(CoordinatorConfigTest, UnknownKeyNamesFileLineAndSuggestion) {
  const std::string path = Write("c.yaml", "allow_no_auth: true\n\nlissten: x:1\n");
  auto config = LoadCoordinatorConfig(path, {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(config.status().message().find(path + ":3: unknown key 'lissten'"), std::string::npos)
      << config.status();
  EXPECT_NE(config.status().message().find("did you mean 'listen'"), std::string::npos)
      << config.status();
}

// A folder given as the config is refused by name, not read as an empty file.
TEST_F(CoordinatorConfigTest, ADirectoryIsNotAConfig) {
  auto config = LoadCoordinatorConfig(root_, {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(config.status().message().find(root_ + ": is a directory, expected a file"), std::string::npos)
      << config.status();
}

TEST_F(CoordinatorConfigTest, WrongTypesAndValuesNameTheKey) {
  const std::string path = Write("c.yaml", "allow_no_auth: true\nmax_restarts: many\n");
  auto config = LoadCoordinatorConfig(path, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(path + ":2: key 'max_restarts': expected an integer, got 'many'"),
            std::string::npos)
      << config.status();

  const std::string timeout = Write("t.yaml", "allow_no_auth: true\nheartbeat_timeout_s: 1\n");
  config = LoadCoordinatorConfig(timeout, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(timeout + ":2: key 'heartbeat_timeout_s'"), std::string::npos)
      << config.status();

  config = LoadCoordinatorConfig("", {{"listen", "nohostport", "--listen nohostport"},
                                      {"allow_no_auth", "true", "--set allow_no_auth=true"}});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("key 'listen'"), std::string::npos) << config.status();
}

// retention_days: 0 (keep for ever) to 36500; anything else is refused by key and value.
TEST_F(CoordinatorConfigTest, RetentionDaysIsBounded) {
  for (const char* bad : {"-1", "40000", "nan"}) {
    auto config = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"},
                                             {"retention_days", bad, absl::StrCat("--set retention_days=", bad)}});
    ASSERT_FALSE(config.ok()) << bad;
    EXPECT_NE(config.status().message().find("key 'retention_days'"), std::string::npos) << config.status();
    EXPECT_NE(config.status().message().find(absl::StrCat("--set retention_days=", bad)), std::string::npos)
        << config.status();
  }
  auto config = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"},
                                           {"retention_days", "0", "--set retention_days=0"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->retention_days, 0);
}

TEST_F(CoordinatorConfigTest, NoTokenNeedsAllowNoAuth) {
  auto config = LoadCoordinatorConfig("", {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("token_file"), std::string::npos) << config.status();
  config = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->allow_no_auth);
}

TEST_F(CoordinatorConfigTest, FlagsOverrideKeysAndPathsResolve) {
  fs::create_directories(root_ + "/etc");
  const std::string path =
      Write("etc/c.yaml", "token_file: tok\nworker_token_file: wtok\ndatabase: state/aviary.db\nmax_restarts: 1\n");
  auto config = LoadCoordinatorConfig(
      path, {{"max_restarts", "5", "--max-restarts 5"}, {"work_dir", "/abs/runs", "--work-dir /abs/runs"},
             {"metrics_listen", "", "--metrics-listen "}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->token_file, root_ + "/etc/tok");        // relative to the file's folder
  EXPECT_EQ(config->worker_token_file, root_ + "/etc/wtok");
  EXPECT_EQ(config->database, root_ + "/etc/state/aviary.db");
  EXPECT_EQ(config->max_restarts, 5);
  EXPECT_EQ(config->work_dir, "/abs/runs");
  EXPECT_EQ(config->metrics_listen, "");  // disabled

  auto bad = LoadCoordinatorConfig(path, {{"max_restarts", "-1", "--max-restarts -1"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--max-restarts -1: key 'max_restarts'"), std::string::npos)
      << bad.status();

  auto unknown = ParseSetOverride("listn=1");
  ASSERT_TRUE(unknown.ok());
  bad = LoadCoordinatorConfig(path, {*unknown});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--set listn=1: unknown key 'listn'"), std::string::npos)
      << bad.status();
  EXPECT_FALSE(ParseSetOverride("no-equals").ok());
}

// A token file lists every valid token, one a line (rotation); blank and '#' lines are ignored.
TEST_F(CoordinatorConfigTest, TokenFileListsTrimmedTokensOneALine) {
  auto tokens = ReadTokenFile(Write("t1", "# rotated 2026-12-03\n  abc123  \n\nsecond\n"));
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(*tokens, (std::vector<std::string>{"abc123", "second"}));
  auto empty = ReadTokenFile(Write("t2", "   \n# only a comment\n"));
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.status().message().find("holds no token"), std::string::npos) << empty.status();
  EXPECT_NE(empty.status().message().find(root_ + "/t2"), std::string::npos) << empty.status();
  EXPECT_EQ(ReadTokenFile(root_ + "/missing").status().code(), absl::StatusCode::kNotFound);
}

// Auth on needs the client and the worker token files; client certificates need TLS.
TEST_F(CoordinatorConfigTest, AuthNeedsClientAndWorkerTokenFiles) {
  const std::string path = Write("c.yaml", "token_file: token\n");
  auto config = LoadCoordinatorConfig(path, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("key 'worker_token_file'"), std::string::npos) << config.status();
  config = LoadCoordinatorConfig(path, {{"worker_token_file", "w", "--worker-token-file w"},
                                        {"viewer_token_file", "v", "--viewer-token-file v"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->token_file, root_ + "/token");
  EXPECT_EQ(config->worker_token_file, (fs::current_path() / "w").string());
  EXPECT_EQ(config->viewer_token_file, (fs::current_path() / "v").string());
  auto mtls = LoadCoordinatorConfig(path, {{"worker_token_file", "w", "--worker-token-file w"},
                                           {"tls_client_ca_file", "ca.pem", "--set tls_client_ca_file=ca.pem"}});
  ASSERT_FALSE(mtls.ok());
  EXPECT_NE(mtls.status().message().find("--set tls_client_ca_file=ca.pem: key 'tls_client_ca_file'"),
            std::string::npos)
      << mtls.status();
}

}  // namespace
}  // namespace aviary::coordinator
