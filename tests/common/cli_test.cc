// common/cli: the numeric flag validators.
#include "common/cli.h"

#include <cstdint>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace aviary::common {
namespace {

// Parses `args` (after the program name) into an app with `--n` in [min, max].
template <typename T>
std::string Parse(const std::vector<std::string>& args, T* out, T min, T max) {
  CLI::App app("test");
  AddNumber(&app, "--n", out, "N", "a number", min, max);
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::ParseError& e) {
    return e.what();
  }
  return "";
}

// Integers read in base 10 whatever CLI11 would make of them: a leading zero is not octal.
TEST(CliTest, IntegersAreBaseTen) {
  int n = -1;
  EXPECT_EQ(Parse<int>({"--n", "0042"}, &n, 0, 100), "");
  EXPECT_EQ(n, 42);
  EXPECT_EQ(Parse<int>({"--n", "09"}, &n, 0, 100), "");
  EXPECT_EQ(n, 9);
  EXPECT_EQ(Parse<int>({"--n", "+7"}, &n, 0, 100), "");
  EXPECT_EQ(n, 7);
  uint32_t seed = 0;
  EXPECT_EQ(Parse<uint32_t>({"--n", "010"}, &seed, 0, 4294967295u), "");
  EXPECT_EQ(seed, 10u);
  int64_t big = 0;
  EXPECT_EQ(Parse<int64_t>({"--n", "-0010"}, &big, -100, 100), "");
  EXPECT_EQ(big, -10);
}

TEST(CliTest, BadIntegersNameTheRangeAndText) {
  int n = 3;
  EXPECT_NE(Parse<int>({"--n", "0x10"}, &n, 0, 100).find("expected an integer in [0, 100], got '0x10'"),
            std::string::npos);
  EXPECT_NE(Parse<int>({"--n", "101"}, &n, 0, 100).find("got '101'"), std::string::npos);
  EXPECT_NE(Parse<int>({"--n", "abc"}, &n, 0, 100).find("got 'abc'"), std::string::npos);
  EXPECT_NE(Parse<int>({"--n", "99999999999999999999"}, &n, 0, 100).find("got '99999999999999999999'"),
            std::string::npos);
  EXPECT_EQ(n, 3);
}

}  // namespace
}  // namespace aviary::common
