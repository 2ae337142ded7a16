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

}  // namespace
}  // namespace aviary::common
