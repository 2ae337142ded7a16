#include "common/manifest.h"

#include "gtest/gtest.h"

namespace aviary::common {
namespace {

TaskManifest Sample() {
  TaskManifest m;
  m.stage = "finetune";
  m.fold = 3;
  m.class_names = {"asbfly", "comma,bird", "quote\"d"};
  m.train = {{"/data/a b/XC1.ogg", 0}, {"/data/x,y/XC2.ogg", 1}, {"/data/x,y/XC2.ogg", 1}, {"/d/XC3.ogg", 2}};
  m.valid = {{"/d/XC4.ogg", 2}};
  return m;
}

TEST(ManifestTest, RoundTripKeepsOrderRepeatsAndQuoting) {
  TaskManifest m = Sample();
  auto parsed = ParseManifestCsv(ManifestToCsv(m), "task.csv");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->stage, "finetune");
  EXPECT_EQ(parsed->fold, 3);
  EXPECT_EQ(parsed->class_names, m.class_names);
  ASSERT_EQ(parsed->train.size(), 4u);
  ASSERT_EQ(parsed->valid.size(), 1u);
  for (size_t i = 0; i < m.train.size(); ++i) {
    EXPECT_EQ(parsed->train[i].path, m.train[i].path);
    EXPECT_EQ(parsed->train[i].target, m.train[i].target);
  }
  EXPECT_EQ(parsed->valid[0].path, "/d/XC4.ogg");
}

TEST(ManifestTest, BadInputNamesTheLine) {
  std::string csv = ManifestToCsv(Sample());
  auto bad_target = ParseManifestCsv(csv + "train,/d/XC9.ogg,7\n", "m.csv");
  ASSERT_FALSE(bad_target.ok());
  EXPECT_NE(bad_target.status().message().find("m.csv:12"), std::string::npos) << bad_target.status();
  EXPECT_NE(bad_target.status().message().find("target 7"), std::string::npos);
  auto bad_split = ParseManifestCsv(csv + "test,/d/XC9.ogg,0\n", "m.csv");
  ASSERT_FALSE(bad_split.ok());
  EXPECT_NE(bad_split.status().message().find("unknown split 'test'"), std::string::npos);
  EXPECT_FALSE(ParseManifestCsv("filename,primary_label,target\n", "m.csv").ok());
  EXPECT_FALSE(ParseManifestCsv("split,path,target\nstage,finetune,\nfold,,0\nclass,a,0\n", "m.csv").ok());
  auto not_int = ParseManifestCsv("split,path,target\nstage,finetune,\nfold,,x\n", "m.csv");
  ASSERT_FALSE(not_int.ok());
  EXPECT_NE(not_int.status().message().find("m.csv:3"), std::string::npos) << not_int.status();
}

// A row that says something twice, or a number written other than as ManifestToCsv writes it,
// is refused at its line rather than read one way or the other.
TEST(ManifestTest, RepeatsAndLooseNumbersAreRefused) {
  const std::string head = "split,path,target\n";
  const std::string tail = "class,a,0\nclass,b,1\ntrain,/d/1.ogg,0\n";
  ASSERT_TRUE(ParseManifestCsv(head + "stage,finetune,\nfold,,-1\n" + tail, "m.csv").ok());
  auto two_stages = ParseManifestCsv(head + "stage,finetune,\nstage,pretrain,\nfold,,0\n" + tail, "m.csv");
  ASSERT_FALSE(two_stages.ok());
  EXPECT_NE(two_stages.status().message().find("m.csv:3: a second stage row ('pretrain' after 'finetune')"),
            std::string::npos)
      << two_stages.status();
  auto two_folds = ParseManifestCsv(head + "stage,finetune,\nfold,,0\nfold,,2\n" + tail, "m.csv");
  ASSERT_FALSE(two_folds.ok());
  EXPECT_NE(two_folds.status().message().find("m.csv:4: a second fold row (2 after 0)"), std::string::npos)
      << two_folds.status();
  auto same_class = ParseManifestCsv(head + "stage,finetune,\nfold,,0\nclass,a,0\nclass,a,1\ntrain,/d/1.ogg,0\n",
                                     "m.csv");
  ASSERT_FALSE(same_class.ok());
  EXPECT_NE(same_class.status().message().find("m.csv:5: class 'a' at index 1 is already class 0"),
            std::string::npos)
      << same_class.status();
  auto nameless = ParseManifestCsv(head + "stage,finetune,\nfold,,0\nclass,,0\ntrain,/d/1.ogg,0\n", "m.csv");
  ASSERT_FALSE(nameless.ok());
  EXPECT_NE(nameless.status().message().find("class 0 has no name"), std::string::npos) << nameless.status();
  for (const char* loose : {" 1", "1 ", "+1", "1.0", "0x1", "", "99999999999"}) {
    auto parsed = ParseManifestCsv(head + "stage,finetune,\nfold,,0\n" + tail + "train,/d/2.ogg," + loose + "\n",
                                   "m.csv");
    ASSERT_FALSE(parsed.ok()) << "'" << loose << "'";
    EXPECT_NE(parsed.status().message().find("m.csv:7: target '"), std::string::npos) << parsed.status();
  }
}

}  // namespace
}  // namespace aviary::common
