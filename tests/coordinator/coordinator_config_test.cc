#include "coordinator/coordinator_config.h"

#include <stdlib.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/config.h"
#include "coordinator/service.h"
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
  // A missing folder and a file are refused, naming the line, the key and the path. A missing one
  // is UNAVAILABLE (a share not mounted yet: the coordinator exits 1, which systemd restarts),
  // said only when nothing else is wrong.
  config = LoadCoordinatorConfig(Write("e.yaml", "allow_no_auth: true\ndata_roots:\n  - missing\n"), {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(config.status().message().find(root_ + "/e.yaml:3: key 'data_roots' [0]: '" + root_ +
                                           "/missing': No such file or directory"),
            std::string::npos)
      << config.status();
  config = LoadCoordinatorConfig(Write("e2.yaml", "allow_no_auth: true\ndata_roots:\n  - missing\nlisten: bogus\n"), {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << config.status();
  EXPECT_NE(config.status().message().find("listen"), std::string::npos) << config.status();
  config = LoadCoordinatorConfig(Write("empty.yaml", "allow_no_auth: true\ndata_roots: [\"\"]\n"), {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(root_ + "/empty.yaml:2: key 'data_roots' [0]: an empty path"),
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

// Booleans read as in the pipeline config (common::ParseYamlBool); a file over the config cap is
// refused naming it.
TEST_F(CoordinatorConfigTest, BooleansAndSizeAsThePipelineConfig) {
  auto config = LoadCoordinatorConfig(Write("on.yaml", "allow_no_auth: On\n"), {});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->allow_no_auth);
  const std::string y = Write("y.yaml", "allow_no_auth: y\n");
  config = LoadCoordinatorConfig(y, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("allow_no_auth"), std::string::npos) << config.status();
  EXPECT_NE(config.status().message().find("expected true or false, got 'y'"), std::string::npos) << config.status();
  const std::string big = Write("big.yaml", "allow_no_auth: true\n# " + std::string(common::kMaxConfigBytes, 'x') + "\n");
  config = LoadCoordinatorConfig(big, {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(config.status().message().find(big + ": larger than"), std::string::npos) << config.status();
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

// A second YAML document was ignored, unknown keys and all.
TEST_F(CoordinatorConfigTest, ASecondDocumentIsRefused) {
  const std::string path = Write("c.yaml", "allow_no_auth: true\n---\nlistn: x:1\n");
  auto config = LoadCoordinatorConfig(path, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(path + ":2: a second YAML document"), std::string::npos)
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

  // A leading zero: octal 8 to a YAML 1.1 reader, 10 to a decimal one.
  const std::string octal = Write("o.yaml", "allow_no_auth: true\nmax_restarts: 010\n");
  auto leading_zero = LoadCoordinatorConfig(octal, {});
  ASSERT_FALSE(leading_zero.ok());
  EXPECT_NE(leading_zero.status().message().find(octal + ":2: key 'max_restarts': expected an integer without a "
                                                 "leading zero"),
            std::string::npos)
      << leading_zero.status();
  // A control character in a path (a YAML escape): the OS would see the path cut at a NUL.
  const std::string nul = Write("n.yaml", "allow_no_auth: true\ndatabase: \"/srv/aviary.db\\0x\"\n");
  auto with_nul = LoadCoordinatorConfig(nul, {});
  ASSERT_FALSE(with_nul.ok());
  EXPECT_NE(with_nul.status().message().find(nul + ":2: key 'database': expected a string without control "
                                             "characters"),
            std::string::npos)
      << with_nul.status();
  // A number beyond int names the key's range (it read as "expected an integer", which it is).
  const std::string huge = Write("m.yaml", "allow_no_auth: true\nmax_restarts: 99999999999\n");
  config = LoadCoordinatorConfig(huge, {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().message(), huge + ":2: key 'max_restarts': expected an integer in 0..1000, got '99999999999'");
  config = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"},
                                      {"max_restarts", "1001", "--max-restarts 1001"}});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().message(), "--max-restarts 1001: key 'max_restarts': expected an integer in 0..1000, got '1001'");
  config = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"},
                                      {"max_restarts", "+7", "--set max_restarts=+7"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->max_restarts, 7);

  const std::string timeout = Write("t.yaml", "allow_no_auth: true\nheartbeat_timeout_s: 1\n");
  config = LoadCoordinatorConfig(timeout, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(timeout + ":2: key 'heartbeat_timeout_s'"), std::string::npos)
      << config.status();
  // The bound it names is the one a value just over the interval is then told: the least allowed.
  EXPECT_NE(config.status().message().find(": 1: expected at least 4.5 (a group's lease must span two heartbeats "
                                           "of heartbeat_interval_s 2) and at most 86400"),
            std::string::npos)
      << config.status();

  // A work_dir that is not UTF-8 once resolved (a relative one, in a config folder whose name is
  // not UTF-8) is a config error naming the line (exit 2), not a failed start.
  fs::create_directory(root_ + "/caf\xe9");
  const std::string latin1 = Write("caf\xe9/c.yaml", "allow_no_auth: true\nwork_dir: runs\n");
  config = LoadCoordinatorConfig(latin1, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(":2: key 'work_dir': '"), std::string::npos) << config.status();
  EXPECT_NE(config.status().message().find("' is not UTF-8 (byte " + std::to_string(root_.size() + 4) + ")"),
            std::string::npos)
      << config.status();

  config = LoadCoordinatorConfig("", {{"listen", "nohostport", "--listen nohostport"},
                                      {"allow_no_auth", "true", "--set allow_no_auth=true"}});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("key 'listen'"), std::string::npos) << config.status();
}

// A quoted number or boolean is a string, as in the pipeline config and to PyYAML; a number is
// decimal (a hex float is a string to PyYAML). A flag's value, as typed, stays a number.
TEST_F(CoordinatorConfigTest, QuotedAndHexNumbersAreRefused) {
  const struct {
    const char* line;
    const char* message;
  } cases[] = {
      {"max_restarts: \"3\"", ":2: key 'max_restarts': expected an integer (not quoted or tagged), got '3'"},
      {"heartbeat_timeout_s: '60'", ":2: key 'heartbeat_timeout_s': expected a number of seconds (not quoted or tagged), got '60'"},
      {"heartbeat_timeout_s: 0x3c", ":2: key 'heartbeat_timeout_s': expected a number of seconds, got '0x3c'"},
      {"retention_days: 030", ":2: key 'retention_days': expected a number without a leading zero"},
      {"allow_no_auth: \"true\"", ":1: key 'allow_no_auth': expected true or false (not quoted or tagged), got 'true'"},
  };
  int i = 0;
  for (const auto& c : cases) {
    const bool own_line = absl::StartsWith(c.line, "allow_no_auth");
    const std::string path =
        Write(absl::StrCat("q", i++, ".yaml"), absl::StrCat(own_line ? "" : "allow_no_auth: true\n", c.line, "\n"));
    auto config = LoadCoordinatorConfig(path, {});
    ASSERT_FALSE(config.ok()) << c.line;
    EXPECT_NE(config.status().message().find(path + c.message), std::string::npos) << config.status();
  }
  // Strings as the pipeline config takes them: no DEL, C1 or U+2028, no lone byte from "\N"; a
  // long unknown key is cut in the message.
  for (const char* escape : {"\\x7f", "\\x85", "\\u2028", "\\N"}) {
    const std::string p = Write("esc.yaml", absl::StrCat("allow_no_auth: true\ndatabase: \"/srv/a", escape, "b.db\"\n"));
    auto refused = LoadCoordinatorConfig(p, {});
    ASSERT_FALSE(refused.ok()) << escape;
    EXPECT_NE(refused.status().message().find(p + ":2: key 'database': expected "), std::string::npos) << refused.status();
  }
  const std::string long_key = Write("long.yaml", absl::StrCat("allow_no_auth: true\n", std::string(1000, 'k'), ": 1\n"));
  auto unknown = LoadCoordinatorConfig(long_key, {});
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("...' (1000 bytes)"), std::string::npos) << unknown.status();
  EXPECT_LT(unknown.status().message().size(), 2000u);
  const std::string path = Write("flags.yaml", "allow_no_auth: true\nheartbeat_timeout_s: 90.5\n");
  auto config = LoadCoordinatorConfig(path, {{"max_restarts", "7", "--max-restarts 7"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->max_restarts, 7);
  EXPECT_DOUBLE_EQ(config->heartbeat_timeout_s, 90.5);
}

// A timeout whose lease (less the fence's margin) does not span two heartbeat intervals fenced
// healthy groups' checkpoint writes (interval 2, timeout 2.1: the lease ran out 0.4 s before
// every next heartbeat); an interval under 1 ms reached groups as 0 ms, which they read as "not
// said" and heartbeated every 2 s.
TEST_F(CoordinatorConfigTest, HeartbeatTimeoutCoversTheLeaseMargin) {
  const std::string path = Write("h.yaml", "allow_no_auth: true\nheartbeat_interval_s: 2\nheartbeat_timeout_s: 2.1\n");
  auto config = LoadCoordinatorConfig(path, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(path + ":3: key 'heartbeat_timeout_s': 2.1: too short for "
                                           "heartbeat_interval_s 2"),
            std::string::npos)
      << config.status();
  EXPECT_NE(config.status().message().find("expected at least 4.5"), std::string::npos) << config.status();
  const ConfigOverride no_auth{"allow_no_auth", "true", "--set allow_no_auth=true"};
  // The bounds: 2 x interval + 0.5 s up to 5 s, then 2 x interval / 0.9.
  for (const auto& [interval, timeout, ok] :
       std::vector<std::tuple<std::string, std::string, bool>>{{"2", "4.5", true},
                                                               {"2", "4.4", false},
                                                               {"1", "3", true},
                                                               {"0.2", "1", true},
                                                               {"10", "22.3", true},
                                                               {"10", "22.1", false},
                                                               {"2", "20", true}}) {
    config = LoadCoordinatorConfig("", {no_auth,
                                        {"heartbeat_interval_s", interval, "--set heartbeat_interval_s=" + interval},
                                        {"heartbeat_timeout_s", timeout, "--heartbeat-timeout-s " + timeout}});
    EXPECT_EQ(config.ok(), ok) << interval << " " << timeout << ": " << config.status();
    if (!ok && !config.ok()) {
      EXPECT_NE(config.status().message().find("--heartbeat-timeout-s " + timeout + ": key 'heartbeat_timeout_s'"),
                std::string::npos)
          << config.status();
    }
  }
  // The timeout left at its default: the interval's line is named (the message named the
  // timeout's key alone, with no line: the user had not written it).
  const std::string slow = Write("slow.yaml", "allow_no_auth: true\n\nheartbeat_interval_s: 30\n");
  config = LoadCoordinatorConfig(slow, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(slow + ":3: key 'heartbeat_timeout_s': "), std::string::npos)
      << config.status();
  EXPECT_NE(config.status().message().find("(heartbeat_timeout_s is not set: its default is 20 s; set it with "
                                           "heartbeat_interval_s)"),
            std::string::npos)
      << config.status();
  config = LoadCoordinatorConfig("", {no_auth, {"heartbeat_interval_s", "0.0004", "--set heartbeat_interval_s=0.0004"},
                                      {"heartbeat_timeout_s", "1", "--set heartbeat_timeout_s=1"}});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("--set heartbeat_interval_s=0.0004: key 'heartbeat_interval_s': 0.0004: "
                                           "expected a value in [0.001, 3600]"),
            std::string::npos)
      << config.status();
}

// A syntax error found at the end of the file names its last line, not the one after it.
TEST_F(CoordinatorConfigTest, YamlSyntaxErrorAtTheEndNamesTheLastLine) {
  const std::string path = Write("s.yaml", "allow_no_auth: true\nlisten: [1,\n");
  auto config = LoadCoordinatorConfig(path, {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().message(), path + ":2: YAML syntax error: end of sequence flow not found");
  const std::string tab = Write("tab.yaml", "allow_no_auth: true\n\tlisten: x\n");
  config = LoadCoordinatorConfig(tab, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(tab + ":2: YAML syntax error"), std::string::npos) << config.status();
}

// retention_days: 0 (keep for ever) to 36500; anything else is refused by key and value.
TEST_F(CoordinatorConfigTest, RetentionDaysIsBounded) {
  // Its unit is days (the message said "seconds").
  auto words = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"},
                                          {"retention_days", "30d", "--set retention_days=30d"}});
  ASSERT_FALSE(words.ok());
  EXPECT_EQ(words.status().message(), "--set retention_days=30d: key 'retention_days': expected a number of days, got '30d'");
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

// A flag's value is the text as typed, not YAML: an IPv6 address in brackets, a path with ": " or
// a leading '@'. Only a list key reads "[a, b]" as YAML.
TEST_F(CoordinatorConfigTest, FlagValuesAreTakenAsTyped) {
  const std::string path = Write("c.yaml", "allow_no_auth: true\n");
  auto config = LoadCoordinatorConfig(path, {{"listen", "[::1]:0", "--listen [::1]:0"},
                                             {"work_dir", "/tmp/wd: x", "--work-dir '/tmp/wd: x'"},
                                             {"database", "/tmp/@x.db", "--set database=/tmp/@x.db"},
                                             {"log_level", "debug", "--log-level debug"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->listen, "[::1]:0");
  EXPECT_EQ(config->work_dir, "/tmp/wd: x");
  EXPECT_EQ(config->database, "/tmp/@x.db");
  fs::create_directories(root_ + "/a");
  fs::create_directories(root_ + "/b");
  config = LoadCoordinatorConfig(path, {{"data_roots", "[" + root_ + "/a, " + root_ + "/b]", "--set data_roots=[...]"}});
  ASSERT_TRUE(config.ok()) << config.status();
  const std::string real = fs::canonical(root_).string();
  EXPECT_EQ(config->data_roots, (std::vector<std::string>{real + "/a", real + "/b"}));
  auto bad = LoadCoordinatorConfig(path, {{"work_dir", "/tmp/\xff", "--work-dir /tmp/\xff"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "--work-dir /tmp/\xff: key 'work_dir': byte 0xff is not UTF-8") << bad.status();
}

// A root the file names that is not there (a share not mounted) may be replaced by a flag: the
// roots are resolved once the flags are applied.
TEST_F(CoordinatorConfigTest, AFlagReplacesAMissingDataRootOfTheFile) {
  fs::create_directories(root_ + "/here");
  const std::string path = Write("c.yaml", "allow_no_auth: true\ndata_roots: [/nonexistent/mount]\n");
  auto config = LoadCoordinatorConfig(path, {{"data_roots", root_ + "/here", "--set data_roots=" + root_ + "/here"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->data_roots, (std::vector<std::string>{fs::canonical(root_ + "/here").string()}));
  config = LoadCoordinatorConfig(path, {});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(root_ + "/c.yaml:2: key 'data_roots' [0]: '/nonexistent/mount'"),
            std::string::npos)
      << config.status();
}

// A port file or Grafana link of a listener that is off is refused (it would never be written).
TEST_F(CoordinatorConfigTest, SettingsOfAListenerThatIsOffAreRefused) {
  const std::string path = Write("c.yaml", "allow_no_auth: true\nmetrics_port_file: m.port\n");
  auto config = LoadCoordinatorConfig(path, {{"metrics_listen", "", "--metrics-listen ''"}});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find(root_ + "/c.yaml:2: key 'metrics_port_file': '" + root_ +
                                           "/m.port' is set, but metrics_listen is empty"),
            std::string::npos)
      << config.status();
  EXPECT_TRUE(LoadCoordinatorConfig(path, {}).ok());
  config = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"},
                                      {"console_port_file", "/tmp/c.port", "--console-port-file /tmp/c.port"}});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("--console-port-file /tmp/c.port: key 'console_port_file': '/tmp/c.port' "
                                           "is set, but console_listen is empty"),
            std::string::npos)
      << config.status();
  config = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"},
                                      {"console_grafana_url", "https://g", "--set console_grafana_url=https://g"}});
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("key 'console_grafana_url'"), std::string::npos) << config.status();
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
  // On a reload (allow_empty) a file that says so revokes its role; a zero-byte one (a rewrite
  // caught half-way) is still refused.
  auto revoked = ReadTokenFile(root_ + "/t2", /*allow_empty=*/true);
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_TRUE(revoked->empty());
  auto truncated = ReadTokenFile(Write("t0", ""), /*allow_empty=*/true);
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.status().message().find("keep a '#' line"), std::string::npos) << truncated.status();
  EXPECT_EQ(ReadTokenFile(root_ + "/missing").status().code(), absl::StatusCode::kNotFound);
}

// A token goes in a gRPC header: a byte that cannot (gRPC would abort the caller) is refused
// naming the file, the token and the byte; a leading UTF-8 BOM (Windows editors) is dropped.
TEST_F(CoordinatorConfigTest, TokenFileRefusesBytesAHeaderCannotCarry) {
  auto bom = ReadTokenFile(Write("bom", "\xEF\xBB\xBF" "abc123\n"));
  ASSERT_TRUE(bom.ok()) << bom.status();
  EXPECT_EQ(*bom, (std::vector<std::string>{"abc123"}));
  const std::string control = Write("control", "good\nba\x01" "d\n");
  auto refused = ReadTokenFile(control);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(refused.status().message(),
                                absl::StrCat("token file ", control, ": token 2: byte 0x01 at position 3")))
      << refused.status();
  const std::string utf8 = Write("utf8", "t\xC3\xB6k\n");
  refused = ReadTokenFile(utf8);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "token 1: byte 0xc3 at position 2")) << refused.status();
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

// One HOST:PORT each: a comma would make civetweb open a second listener, and the port is
// digits only (no sign, no space, no civetweb suffix).
TEST_F(CoordinatorConfigTest, ListenAddressesAreOneHostAndADigitsPort) {
  for (std::string CoordinatorConfig::*member :
       {&CoordinatorConfig::listen, &CoordinatorConfig::metrics_listen, &CoordinatorConfig::console_listen}) {
    CoordinatorConfig config;
    config.allow_no_auth = true;
    const std::string key = member == &CoordinatorConfig::listen           ? "listen"
                            : member == &CoordinatorConfig::metrics_listen ? "metrics_listen"
                                                                           : "console_listen";
    for (const char* bad : {"127.0.0.1:0,0.0.0.0:0", "127.0.0.1:+0", "127.0.0.1:-0", "127.0.0.1: 80",
                            "127.0.0.1:80s", "127.0.0.1:", ":80", "127.0.0.1:65536", "127.0.0.1:000080"}) {
      config.*member = bad;
      const absl::Status status = ValidateCoordinatorConfig(config);
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << key << "=" << bad;
      EXPECT_TRUE(absl::StrContains(status.message(), absl::StrCat("key '", key, "': '", bad, "'"))) << status;
    }
    for (const char* good : {"127.0.0.1:0", "0.0.0.0:8443", "localhost:7070", "[::]:7070"}) {
      config.*member = good;
      EXPECT_TRUE(ValidateCoordinatorConfig(config).ok()) << key << "=" << good << ": " << ValidateCoordinatorConfig(config);
    }
  }
  // Through a flag the message points at it.
  auto config = LoadCoordinatorConfig("", {{"allow_no_auth", "true", "--set allow_no_auth=true"},
                                           {"console_listen", "127.0.0.1:0,0.0.0.0:0", "--console-listen X"}});
  ASSERT_FALSE(config.ok());
  EXPECT_TRUE(absl::StrContains(config.status().message(),
                                "--console-listen X: key 'console_listen': '127.0.0.1:0,0.0.0.0:0' holds a comma"))
      << config.status();
}

// With TLS the console is served by TlsFront, which listens on a numeric IPv4 address only.
TEST_F(CoordinatorConfigTest, TheTlsConsoleNeedsANumericIpv4Address) {
  CoordinatorConfig config;
  config.allow_no_auth = true;
  config.tls_cert_file = "c.pem";
  config.tls_key_file = "k.pem";
  for (const char* bad : {"localhost:0", "[::1]:0", "console.example:8443"}) {
    config.console_listen = bad;
    const absl::Status status = ValidateCoordinatorConfig(config);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_TRUE(absl::StrContains(status.message(), absl::StrCat("key 'console_listen': '", bad, "'"))) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), "numeric IPv4")) << status;
  }
  config.console_listen = "0.0.0.0:8443";
  EXPECT_TRUE(ValidateCoordinatorConfig(config).ok());
  // Without TLS civetweb serves it and takes a host name.
  config.tls_cert_file = config.tls_key_file = "";
  config.console_listen = "localhost:0";
  EXPECT_TRUE(ValidateCoordinatorConfig(config).ok());
}

// tls_cert_file and tls_key_file must hold a PEM certificate and a PEM key that fit it; the
// error names the key and the file (not, later, the listen address).
TEST_F(CoordinatorConfigTest, TlsFilesThatAreNotPemAreRefusedByKey) {
  const std::string key = root_ + "/tls.key", cert = root_ + "/tls.crt", other = root_ + "/other.key";
  const std::string make = absl::StrCat("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -keyout ",
                                        key, " -out ", cert, " > /dev/null 2>&1 && openssl genrsa -out ", other,
                                        " 2048 > /dev/null 2>&1");
  ASSERT_EQ(std::system(make.c_str()), 0) << "openssl could not make a certificate";
  const std::string junk = Write("junk.pem", "not a certificate\n");
  CoordinatorConfig config;
  config.allow_no_auth = true;
  config.tls_cert_file = cert;
  config.tls_key_file = key;
  ASSERT_TRUE(LoadCoordinatorSecrets(config).ok()) << LoadCoordinatorSecrets(config).status();

  config.tls_cert_file = junk;
  auto secrets = LoadCoordinatorSecrets(config);
  ASSERT_FALSE(secrets.ok());
  EXPECT_EQ(secrets.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(secrets.status().message(), "key 'tls_cert_file': " + junk)) << secrets.status();

  config.tls_cert_file = cert;
  config.tls_key_file = junk;
  secrets = LoadCoordinatorSecrets(config);
  ASSERT_FALSE(secrets.ok());
  EXPECT_TRUE(absl::StrContains(secrets.status().message(), "key 'tls_key_file': " + junk)) << secrets.status();

  config.tls_key_file = cert;  // a certificate where the key should be
  secrets = LoadCoordinatorSecrets(config);
  ASSERT_FALSE(secrets.ok());
  EXPECT_TRUE(absl::StrContains(secrets.status().message(), "key 'tls_key_file': " + cert)) << secrets.status();

  config.tls_key_file = other;  // a key, but not the certificate's
  secrets = LoadCoordinatorSecrets(config);
  ASSERT_FALSE(secrets.ok());
  EXPECT_TRUE(absl::StrContains(secrets.status().message(), "key 'tls_key_file': " + other)) << secrets.status();
  EXPECT_TRUE(absl::StrContains(secrets.status().message(), "does not match")) << secrets.status();

  // An encrypted key: refused, saying so (no passphrase prompt; gRPC cannot use one).
  const std::string encrypted = root_ + "/enc.key";
  ASSERT_EQ(std::system(absl::StrCat("openssl pkey -in ", key, " -aes256 -passout pass:secret -out ", encrypted,
                                     " > /dev/null 2>&1").c_str()),
            0);
  config.tls_key_file = encrypted;
  secrets = LoadCoordinatorSecrets(config);
  ASSERT_FALSE(secrets.ok());
  EXPECT_TRUE(absl::StrContains(secrets.status().message(),
                                "key 'tls_key_file': " + encrypted + ": an encrypted private key (a passphrase) is not supported"))
      << secrets.status();

  // tls_client_ca_file: certificates that parse, not just their header line.
  config.tls_key_file = key;
  config.tls_client_ca_file = cert;
  EXPECT_TRUE(LoadCoordinatorSecrets(config).ok()) << LoadCoordinatorSecrets(config).status();
  // A "TRUSTED CERTIFICATE" (openssl x509 -trustout), which gRPC reads too.
  const std::string trusted = root_ + "/trusted.pem";
  ASSERT_EQ(std::system(absl::StrCat("openssl x509 -in ", cert, " -trustout -out ", trusted, " > /dev/null 2>&1").c_str()),
            0);
  config.tls_client_ca_file = trusted;
  EXPECT_TRUE(LoadCoordinatorSecrets(config).ok()) << LoadCoordinatorSecrets(config).status();
  const std::string broken =
      Write("broken-ca.pem", "-----BEGIN CERTIFICATE-----\nnotbase64!!\n-----END CERTIFICATE-----\n");
  for (const std::string& ca : {broken, junk}) {
    config.tls_client_ca_file = ca;
    secrets = LoadCoordinatorSecrets(config);
    ASSERT_FALSE(secrets.ok()) << ca;
    EXPECT_TRUE(absl::StrContains(secrets.status().message(),
                                  "key 'tls_client_ca_file': " + ca + ": not a PEM certificate list"))
        << secrets.status();
  }
}

}  // namespace
}  // namespace aviary::coordinator
