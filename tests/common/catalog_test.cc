#include "common/catalog.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace aviary::common {
namespace {

namespace fs = std::filesystem;

// A scratch tree of hand-written metadata and (empty) audio files; the catalog only checks that
// audio files exist, decoding is the data plane's job.
class CatalogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/aviary_catalog_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    config_.seed = 42;
    config_.folds.finetune_splits = 2;
    config_.folds.pretrain_splits = 2;
    config_.folds.cv_filter_thr = 2;
    config_.sampling.upsample_thr = 3;
    config_.sampling.downsample_thr = 4;
    config_.data.target = {"2024", root_ + "/t24"};
    config_.data.pretrain_sources = {{"2021", root_ + "/p21"}, {"xc", root_ + "/xc"}};
  }
  void TearDown() override { fs::remove_all(root_); }

  void Write(const std::string& rel, const std::string& text) {
    fs::path p = fs::path(root_) / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  void Touch(const std::string& rel) { Write(rel, ""); }

  // Target: 6 rows, labels a (4) and b (2); XC1 also appears in the pool.
  void WriteTarget() {
    Write("t24/train_metadata.csv",
          "primary_label,secondary_labels,author,rating,filename\n"
          "a,[],ann,4.0,a/XC1.ogg\n"
          "a,['b'],ann,3.5,a/XC2.ogg\n"
          "b,['zzz'],bob,5.0,b/XC3.ogg\n"
          "a,[],cy,2.0,a/XC4.ogg\n"
          "b,[],bob,1.0,b/XC5.ogg\n"
          "a,[],cy,2.0,a/XC6.ogg\n");
    for (const char* f : {"a/XC1.ogg", "a/XC2.ogg", "b/XC3.ogg", "a/XC4.ogg", "b/XC5.ogg", "a/XC6.ogg"}) {
      Touch(std::string("t24/train_audio/") + f);
    }
  }

  // Pool: 2021 rows then xc rows. Duplicates, a target overlap, a known all-zero file, a
  // missing file and a corrupt-listed file, each exactly once.
  void WritePool() {
    Write("p21/train_metadata.csv",
          "primary_label,secondary_labels,author,filename\n"
          "houwre,[],h,XC590621.ogg\n"   // known all-zero 2021 file
          "c,[],x,XC10.ogg\n"
          "c,[],x,XC11.ogg\n"
          "c,[],x,XC12.ogg\n"
          "d,[],y,XC20.ogg\n"
          "d,[],y,XC21.ogg\n"
          "a,[],ann,XC1.ogg\n"           // also in the target
          "d,[],y,XC22.ogg\n");          // its audio file is missing
    for (const char* f : {"houwre/XC590621.ogg", "c/XC10.ogg", "c/XC11.ogg", "c/XC12.ogg",
                          "d/XC20.ogg", "d/XC21.ogg", "a/XC1.ogg"}) {
      Touch(std::string("p21/train_short_audio/") + f);
    }
    Write("xc/train_extended.csv",
          "ebird_code,filename,author,primary_label,secondary_labels\n"
          "c,XC10.mp3,x,Sci c_Common c,[]\n"  // duplicate of 2021's XC10 (same id, label, author)
          "c,XC13.mp3,x,Sci c_Common c,[]\n"
          "c,XC14.mp3,x,Sci c_Common c,[]\n"
          "c,XC15.mp3,x,Sci c_Common c,[]\n"
          "c,XC16.mp3,x,Sci c_Common c,[]\n"
          "c,XC17.mp3,x,Sci c_Common c,[]\n"
          "nuthat,XC30.mp3,n,Sci n_Common n,[]\n"
          "nuthat,XC31.mp3,n,Sci n_Common n,[]\n"
          "nuthat,XC32.mp3,m,Sci n_Common n,[]\n");  // on the corrupt list
    for (const char* f : {"A-M/c/XC10.mp3", "A-M/c/XC13.mp3", "A-M/c/XC14.mp3", "A-M/c/XC15.mp3",
                          "A-M/c/XC16.mp3", "A-M/c/XC17.mp3", "N-Z/nuthat/XC30.mp3",
                          "N-Z/nuthat/XC31.mp3", "N-Z/nuthat/XC32.mp3"}) {
      Touch(std::string("xc/") + f);
    }
    Write("corrupt.json", "[\"/kaggle/input/xeno-canto-n-z/N-Z/nuthat/XC32.mp3\"]");
    config_.data.corrupt_files = root_ + "/corrupt.json";
  }

  std::string root_;
  PipelineConfig config_;
};

TEST_F(CatalogTest, FinetuneTableHasSortedLabelMapFoldsAndCv) {
  WriteTarget();
  auto table = BuildStageTable(config_, "finetune");
  ASSERT_TRUE(table.ok()) << table.status();
  ASSERT_EQ(table->samples.size(), 6u);
  EXPECT_EQ(table->class_names, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(table->samples[0].filepath, root_ + "/t24/train_audio/a/XC1.ogg");
  EXPECT_EQ(table->samples[0].xc_id, "XC1");
  EXPECT_EQ(table->samples[2].target, 1);
  EXPECT_EQ(table->samples[1].secondary_labels, std::vector<std::string>{"b"});
  EXPECT_EQ(table->unknown_secondary_labels, 1);  // 'zzz'
  for (const Sample& s : table->samples) {
    EXPECT_TRUE(s.fold == 0 || s.fold == 1);
    EXPECT_TRUE(s.cv);  // both classes have >= cv_filter_thr (2) rows
  }
  EXPECT_EQ(table->samples[3].metadata, root_ + "/t24/train_metadata.csv:5");
}

TEST_F(CatalogTest, PretrainPoolAppliesTheSeedRulesInOrder) {
  WriteTarget();
  WritePool();
  auto table = BuildStageTable(config_, "pretrain");
  ASSERT_TRUE(table.ok()) << table.status();
  ASSERT_EQ(table->sources.size(), 2u);
  const SourceReport& p21 = table->sources[0];
  const SourceReport& xc = table->sources[1];
  EXPECT_EQ(p21.rows_read, 8);
  EXPECT_EQ(p21.corrupt_dropped, 1);         // houwre/XC590621.ogg
  EXPECT_EQ(p21.target_overlap_dropped, 1);  // XC1
  EXPECT_EQ(p21.missing_file_dropped, 1);    // XC22
  ASSERT_EQ(p21.missing_examples.size(), 1u);
  EXPECT_EQ(p21.missing_examples[0], root_ + "/p21/train_short_audio/d/XC22.ogg");
  // Its folder, for the coordinator's fold cache to watch (the file appearing changes the rows).
  EXPECT_EQ(p21.missing_folders, std::vector<std::string>{root_ + "/p21/train_short_audio/d"});
  EXPECT_EQ(p21.kept, 5);
  EXPECT_EQ(xc.duplicates_dropped, 1);  // XC10 again
  EXPECT_EQ(xc.corrupt_dropped, 1);     // XC32 via the /kaggle/... list entry
  EXPECT_EQ(xc.kept, 7);
  EXPECT_EQ(table->samples.size(), 12u);
  EXPECT_EQ(table->class_names, (std::vector<std::string>{"c", "d", "nuthat"}));
  // xc rows take their label from ebird_code and their folder from its first letter.
  EXPECT_EQ(table->samples.back().filepath, root_ + "/xc/N-Z/nuthat/XC31.mp3");
  EXPECT_EQ(table->samples.back().primary_label, "nuthat");
}

// A corrupt-list path written on another machine drops the row of the source whose root its
// folder names (2022 and 2023 share the relative layout train_audio/<label>/<file>: a listed 2023
// file dropped 2022's copy too, where the notebook compares whole paths); a path whose folder
// names no source drops every source's row with that relative path, as before.
TEST_F(CatalogTest, ACorruptListPathDropsTheRowOfTheSourceItsFolderNames) {
  WriteTarget();
  config_.data.pretrain_sources = {{"2023", root_ + "/birdclef-a"}, {"2023", root_ + "/birdclef-b/"}};
  const char* header = "primary_label,secondary_labels,author,rating,filename\n";
  Write("birdclef-a/train_metadata.csv", absl::StrCat(header, "c,[],p,4.0,c/XC40.ogg\nc,[],p,4.0,c/XC41.ogg\n",
                                                      "c,[],p,4.0,c/XC42.ogg\nd,[],p,4.0,d/XC50.ogg\n",
                                                      "d,[],p,4.0,d/XC51.ogg\n"));
  Write("birdclef-b/train_metadata.csv", absl::StrCat(header, "c,[],q,4.0,c/XC40.ogg\nc,[],q,4.0,c/XC43.ogg\n",
                                                      "d,[],q,4.0,d/XC52.ogg\n"));
  for (const char* f : {"birdclef-a/train_audio/c/XC40.ogg", "birdclef-a/train_audio/c/XC41.ogg",
                        "birdclef-a/train_audio/c/XC42.ogg", "birdclef-a/train_audio/d/XC50.ogg",
                        "birdclef-a/train_audio/d/XC51.ogg", "birdclef-b/train_audio/c/XC40.ogg",
                        "birdclef-b/train_audio/c/XC43.ogg", "birdclef-b/train_audio/d/XC52.ogg"}) {
    Touch(f);
  }
  config_.data.corrupt_files = root_ + "/corrupt.json";
  Write("corrupt.json", "[\"/kaggle/input/birdclef-b/train_audio/c/XC40.ogg\"]");
  auto table = BuildStageTable(config_, "pretrain");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->sources[0].corrupt_dropped, 0);
  EXPECT_EQ(table->sources[1].corrupt_dropped, 1);
  EXPECT_EQ(table->samples.size(), 7u);
  Write("corrupt.json", "[\"/elsewhere/train_audio/c/XC40.ogg\"]");
  table = BuildStageTable(config_, "pretrain");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->sources[0].corrupt_dropped, 1);
  EXPECT_EQ(table->sources[1].corrupt_dropped, 1);
  EXPECT_EQ(table->samples.size(), 6u);
}

// The notebook reads the metadata with pandas, which turns "", "NA", "None", ... into NaN, and
// drop_duplicates takes NaN for equal to NaN: such authors are one author in the dedup.
TEST_F(CatalogTest, AuthorsPandasReadsAsNaNAreOneAuthorInTheDedup) {
  WriteTarget();
  Write("p21/train_metadata.csv",
        "primary_label,secondary_labels,author,filename\n"
        "c,[],NA,XC40.ogg\n"
        "c,[],,XC41.ogg\n"
        "c,[],x,XC42.ogg\n");
  for (const char* f : {"c/XC40.ogg", "c/XC41.ogg", "c/XC42.ogg"}) Touch(std::string("p21/train_short_audio/") + f);
  Write("xc/train_extended.csv",
        "ebird_code,filename,author,primary_label,secondary_labels\n"
        "c,XC40.mp3,,Sci c_Common c,[]\n"       // "NA" before: both NaN, a duplicate
        "c,XC41.mp3,None,Sci c_Common c,[]\n"   // "" before: both NaN, a duplicate
        "c,XC42.mp3,y,Sci c_Common c,[]\n");    // another author: kept
  for (const char* f : {"A-M/c/XC40.mp3", "A-M/c/XC41.mp3", "A-M/c/XC42.mp3"}) Touch(std::string("xc/") + f);
  auto table = BuildStageTable(config_, "pretrain");
  ASSERT_TRUE(table.ok()) << table.status();
  ASSERT_EQ(table->sources.size(), 2u);
  EXPECT_EQ(table->sources[1].duplicates_dropped, 2);
  EXPECT_EQ(table->sources[1].kept, 1);
}

TEST_F(CatalogTest, TrainListUpsamplesAndDownsamplesPretraining) {
  WriteTarget();
  WritePool();
  auto table = BuildStageTable(config_, "pretrain");
  ASSERT_TRUE(table.ok()) << table.status();
  auto list = BuildTrainList(config_, *table, 0);
  ASSERT_TRUE(list.ok()) << list.status();
  std::map<std::string, int> counts;
  for (size_t r : list->train) ++counts[table->samples[r].primary_label];
  for (const auto& [label, n] : counts) {
    EXPECT_GE(n, config_.sampling.upsample_thr) << label;
    EXPECT_LE(n, config_.sampling.downsample_thr) << label;
  }
  for (size_t r : list->valid) EXPECT_EQ(table->samples[r].fold, 0);
  auto bad = BuildTrainList(config_, *table, 2);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("fold 2 is out of range"), absl::string_view::npos);
}

TEST_F(CatalogTest, MissingMetadataNamesTheKeyAndPath) {
  auto table = BuildStageTable(config_, "finetune");
  ASSERT_FALSE(table.ok());
  EXPECT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(table.status().message().find("data.target"), absl::string_view::npos);
  EXPECT_NE(table.status().message().find(root_ + "/t24/train_metadata.csv"), absl::string_view::npos);
}

TEST_F(CatalogTest, MissingColumnIsNamed) {
  Write("t24/train_metadata.csv", "primary_label,author\na,x\n");
  auto table = BuildStageTable(config_, "finetune");
  ASSERT_FALSE(table.ok());
  EXPECT_NE(table.status().message().find(root_ + "/t24/train_metadata.csv:1: missing column 'filename'"),
            absl::string_view::npos)
      << table.status();
  // After a BOM and a blank line the header is on line 2.
  Write("t24/train_metadata.csv", "\xEF\xBB\xBF\r\nprimary_label,author\r\na,x\r\n");
  table = BuildStageTable(config_, "finetune");
  ASSERT_FALSE(table.ok());
  EXPECT_NE(table.status().message().find(root_ + "/t24/train_metadata.csv:2: missing column 'filename'"),
            absl::string_view::npos)
      << table.status();
}

TEST_F(CatalogTest, UnknownLayoutAndStageAreRefused) {
  config_.data.target.layout = "2019";
  auto table = BuildStageTable(config_, "finetune");
  ASSERT_FALSE(table.ok());
  EXPECT_NE(table.status().message().find("data.target.layout"), absl::string_view::npos);
  EXPECT_NE(table.status().message().find("'2019'"), absl::string_view::npos);
  EXPECT_FALSE(BuildStageTable(config_, "warmup").ok());
}

TEST_F(CatalogTest, EmptyLabelsAndMissingFilesAreDroppedAndCounted) {
  // XC3 has no audio file; the second row has no label.
  for (const char* f : {"a/XC1.ogg", "a/XC2.ogg", "b/XC4.ogg", "b/XC5.ogg"}) {
    Touch(std::string("t24/train_audio/") + f);
  }
  Touch("t24/train_audio/a/XC9.ogg");
  Write("t24/train_metadata.csv",
        "primary_label,filename\na,a/XC1.ogg\n,a/XC2.ogg\na,a/XC9.ogg\na,a/XC3.ogg\nb,b/XC4.ogg\nb,b/XC5.ogg\n");
  auto table = BuildStageTable(config_, "finetune");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->sources[0].empty_label_dropped, 1);
  EXPECT_EQ(table->sources[0].missing_file_dropped, 1);
  EXPECT_EQ(table->samples.size(), 4u);
}

// A table of no sample says what became of each source's rows: the caller prints the source
// reports only for a table built, and "see the source reports" pointed at nothing.
TEST_F(CatalogTest, NoUsableSamplesSaysWhatBecameOfEachSource) {
  Write("t24/train_metadata.csv", "primary_label,filename\na,a/XC1.ogg\n,a/XC2.ogg\n");
  auto table = BuildStageTable(config_, "finetune");
  ASSERT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument) << table.status();
  EXPECT_EQ(table.status().message(),
            absl::StrCat("stage 'finetune': no usable samples (2024 ", root_,
                         "/t24/train_metadata.csv: 2 rows read, 0 duplicate, 0 in the target, 0 corrupt, "
                         "1 missing audio, 1 without a label)"));
}

TEST_F(CatalogTest, AllClassesSmallerThanSplitsIsAClearError) {
  WriteTarget();
  config_.folds.finetune_splits = 5;
  auto table = BuildStageTable(config_, "finetune");
  ASSERT_FALSE(table.ok());
  EXPECT_NE(table.status().message().find("cannot make 5 stratified folds"), absl::string_view::npos)
      << table.status();
}

TEST_F(CatalogTest, BadCorruptListIsRefused) {
  WriteTarget();
  WritePool();
  Write("corrupt.json", "{\"not\": \"a list\"}");
  auto table = BuildStageTable(config_, "pretrain");
  ASSERT_FALSE(table.ok());
  EXPECT_NE(table.status().message().find("corrupt.json"), absl::string_view::npos);
  config_.data.corrupt_files = root_ + "/nope.json";
  EXPECT_EQ(BuildStageTable(config_, "pretrain").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CatalogTest, EmptyPretrainSourcesIsRefused) {
  WriteTarget();
  config_.data.pretrain_sources.clear();
  auto table = BuildStageTable(config_, "pretrain");
  ASSERT_FALSE(table.ok());
  EXPECT_NE(table.status().message().find("data.pretrain_sources"), absl::string_view::npos);
}

// A folder with enough wanted files to be checked by one listing (the catalog lists a folder
// from 8 wanted files up) answers as stat would: a regular file exists; a link to one exists; a
// dangling link, a folder of the file's name, a fifo and an absent name do not.
TEST_F(CatalogTest, ListedFoldersAnswerAsStatWould) {
  std::string metadata = "primary_label,filename\n";
  for (int i = 0; i < 10; ++i) {
    absl::StrAppend(&metadata, "a,a/XC", i, ".ogg\n");
    absl::StrAppend(&metadata, "b,b/XC", 100 + i, ".ogg\n");
  }
  Write("t24/train_metadata.csv", metadata);
  const std::string a = root_ + "/t24/train_audio/a/";
  for (int i = 0; i < 10; ++i) Touch(absl::StrCat("t24/train_audio/b/XC", 100 + i, ".ogg"));
  for (int i : {0, 1, 2, 3, 4}) Touch(absl::StrCat("t24/train_audio/a/XC", i, ".ogg"));
  Touch("t24/elsewhere.ogg");
  fs::create_symlink(root_ + "/t24/elsewhere.ogg", a + "XC5.ogg");  // a link to a file: exists
  fs::create_symlink(root_ + "/t24/gone.ogg", a + "XC6.ogg");       // dangling: missing
  fs::create_directories(a + "XC7.ogg");                             // a folder: missing
  ASSERT_EQ(::mkfifo((a + "XC8.ogg").c_str(), 0644), 0);             // a fifo: missing
  // XC9.ogg: absent. Other files in the folder are listed but not wanted.
  Touch("t24/train_audio/a/XC99.ogg");
  Touch("t24/train_audio/a/XC9.ogg.part");
  auto table = BuildStageTable(config_, "finetune");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->sources[0].missing_file_dropped, 4);
  std::set<std::string> kept;
  for (const Sample& s : table->samples) kept.insert(s.filepath.substr(s.filepath.rfind('/') + 1));
  for (int i = 0; i < 10; ++i) EXPECT_EQ(kept.count(absl::StrCat("XC", 100 + i, ".ogg")), 1u) << i;
  for (int i = 0; i < 10; ++i) {
    struct stat st;
    const bool regular = ::stat((a + absl::StrCat("XC", i, ".ogg")).c_str(), &st) == 0 && S_ISREG(st.st_mode);
    EXPECT_EQ(kept.count(absl::StrCat("XC", i, ".ogg")), regular ? 1u : 0u) << i;
    EXPECT_EQ(regular, i <= 5) << i;
  }
  EXPECT_EQ(table->sources[0].missing_examples.size(), 4u);
}

// Both stages built at once (one read of the target) equal each built alone; an error of one
// stage leaves the other.
TEST_F(CatalogTest, StagesBuiltTogetherEqualStagesBuiltAlone) {
  WriteTarget();
  WritePool();
  auto together = BuildStageTables(config_, {"finetune", "pretrain"});
  ASSERT_EQ(together.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const std::string stage = i == 0 ? "finetune" : "pretrain";
    auto alone = BuildStageTable(config_, stage);
    ASSERT_TRUE(together[i].ok()) << together[i].status();
    ASSERT_TRUE(alone.ok()) << alone.status();
    EXPECT_EQ(together[i]->stage, stage);
    EXPECT_EQ(together[i]->class_names, alone->class_names);
    ASSERT_EQ(together[i]->samples.size(), alone->samples.size());
    for (size_t r = 0; r < alone->samples.size(); ++r) {
      const Sample& x = together[i]->samples[r];
      const Sample& y = alone->samples[r];
      EXPECT_EQ(std::tie(x.filepath, x.primary_label, x.secondary_labels, x.author, x.xc_id, x.source, x.metadata,
                         x.rating, x.target, x.fold, x.cv),
                std::tie(y.filepath, y.primary_label, y.secondary_labels, y.author, y.xc_id, y.source, y.metadata,
                         y.rating, y.target, y.fold, y.cv))
          << stage << " row " << r;
    }
    ASSERT_EQ(together[i]->sources.size(), alone->sources.size());
    for (size_t k = 0; k < alone->sources.size(); ++k) {
      EXPECT_EQ(together[i]->sources[k].kept, alone->sources[k].kept);
      EXPECT_EQ(together[i]->sources[k].duplicates_dropped, alone->sources[k].duplicates_dropped);
      EXPECT_EQ(together[i]->sources[k].target_overlap_dropped, alone->sources[k].target_overlap_dropped);
    }
  }
  config_.data.pretrain_sources.clear();
  auto one_fails = BuildStageTables(config_, {"pretrain", "finetune", "warmup"});
  ASSERT_EQ(one_fails.size(), 3u);
  EXPECT_NE(one_fails[0].status().message().find("data.pretrain_sources"), absl::string_view::npos);
  EXPECT_TRUE(one_fails[1].ok()) << one_fails[1].status();
  EXPECT_NE(one_fails[2].status().message().find("unknown stage 'warmup'"), absl::string_view::npos);
  auto twice = BuildStageTables(config_, {"finetune", "finetune"});
  ASSERT_EQ(twice.size(), 2u);
  EXPECT_TRUE(twice[0].ok()) << twice[0].status();
  EXPECT_EQ(twice[1].status().message(), "stage 'finetune' is asked for twice");
}

}  // namespace
}  // namespace aviary::common
