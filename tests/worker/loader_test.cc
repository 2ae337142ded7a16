#include "worker/loader.h"

#include <grp.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <system_error>
#include <map>
#include <memory>
#include <set>
#include <thread>

#include "common/numpy_random.h"
#include "gtest/gtest.h"
#include "worker/device_copy.h"

namespace aviary::worker {
namespace {

std::vector<LoaderItem> MakeItems(int n, int classes = 4) {
  std::vector<LoaderItem> items;
  for (int i = 0; i < n; ++i) items.push_back({"item" + std::to_string(i), i % classes});
  return items;
}

// A clip whose samples encode the item (first sample) and the crop seed (second sample); a
// broken one leaves garbage in its row (the loader must overwrite or drop it).
ClipFn EncodingClip(std::set<std::string> broken = {}) {
  return [broken](const LoaderItem& item, bool train, uint64_t seed, absl::Span<float> out) {
    ClipData c;
    if (broken.count(item.path)) {
      std::fill(out.begin(), out.end(), -7.0f);
      c.problem = "truncated";
      c.message = item.path + ": truncated";
      return c;
    }
    std::fill(out.begin(), out.end(), 0.0f);
    out[0] = static_cast<float>(std::stoi(item.path.substr(4)));
    out[1] = train ? static_cast<float>(seed % 1000) : -1.0f;
    return c;
  };
}

LoaderOptions Options(int batch, int rank = 0, int world = 1, bool train = true) {
  LoaderOptions o;
  o.batch_size = batch;
  o.rank = rank;
  o.world_size = world;
  o.train = train;
  o.clip_samples = 8;
  o.num_classes = 4;
  o.num_threads = 2;
  o.prefetch_batches = 2;
  return o;
}

std::vector<Batch> DrainEpoch(Loader& loader, int epoch) {
  loader.StartEpoch(epoch);
  std::vector<Batch> out;
  Batch b;
  while (true) {
    auto more = loader.Next(&b);
    EXPECT_TRUE(more.ok()) << more.status();
    if (!more.ok() || !*more) break;
    out.push_back(b);
  }
  return out;
}

// Each row of `b` holds its item's clip (EncodingClip's first sample), not another row's.
void ExpectRowsHoldTheirItems(const Batch& b) {
  for (int64_t r = 0; r < b.waveforms.size(0); ++r) {
    EXPECT_EQ(b.waveforms[r][0].item<float>(), static_cast<float>(b.items[r])) << "batch " << b.index << " row " << r;
  }
}

TEST(LoaderTest, TwoRanksSeeWhatOneRankWithDoubleBatchSees) {
  auto items = MakeItems(50);
  auto one = Loader::Create(items, EncodingClip(), Options(8));
  auto r0 = Loader::Create(items, EncodingClip(), Options(4, 0, 2));
  auto r1 = Loader::Create(items, EncodingClip(), Options(4, 1, 2));
  ASSERT_TRUE(one.ok() && r0.ok() && r1.ok());
  for (int epoch : {0, 3}) {
    auto p = (*one)->Plan(epoch), p0 = (*r0)->Plan(epoch), p1 = (*r1)->Plan(epoch);
    ASSERT_EQ(p.size(), 6u);  // 50 / 8, remainder dropped
    ASSERT_EQ(p0.size(), p.size());
    ASSERT_EQ(p1.size(), p.size());
    for (size_t s = 0; s < p.size(); ++s) {
      std::vector<int64_t> joined = p0[s];
      joined.insert(joined.end(), p1[s].begin(), p1[s].end());
      EXPECT_EQ(joined, p[s]) << "epoch " << epoch << " step " << s;
    }
  }
  EXPECT_NE((*one)->Plan(0), (*one)->Plan(1));  // a new order every epoch
}

TEST(LoaderTest, ValidationCoversEveryItemOnceAcrossRanks) {
  auto items = MakeItems(23);
  std::multiset<int64_t> seen;
  for (int rank = 0; rank < 3; ++rank) {
    auto l = Loader::Create(items, EncodingClip(), Options(4, rank, 3, /*train=*/false));
    ASSERT_TRUE(l.ok());
    for (const Batch& b : DrainEpoch(**l, 0)) seen.insert(b.items.begin(), b.items.end());
  }
  ASSERT_EQ(seen.size(), 23u);
  for (int64_t i = 0; i < 23; ++i) EXPECT_EQ(seen.count(i), 1u) << i;
}

TEST(LoaderTest, BatchesArriveInOrderWithTheirItemsAndTargets) {
  auto items = MakeItems(40);
  auto l = Loader::Create(items, EncodingClip(), Options(5));
  ASSERT_TRUE(l.ok());
  auto plan = (*l)->Plan(2);
  auto batches = DrainEpoch(**l, 2);
  ASSERT_EQ(batches.size(), plan.size());
  for (size_t s = 0; s < batches.size(); ++s) {
    const Batch& b = batches[s];
    EXPECT_EQ(b.index, static_cast<int64_t>(s));
    EXPECT_EQ(b.items, plan[s]);
    ASSERT_EQ(b.waveforms.sizes(), (at::IntArrayRef{5, 8}));
    for (int64_t r = 0; r < 5; ++r) {
      EXPECT_EQ(b.waveforms[r][0].item<float>(), static_cast<float>(b.items[r]));
      EXPECT_EQ(b.targets[r].item<int64_t>(), b.items[r] % 4);
    }
  }
}

TEST(LoaderTest, SameSeedSameBatchesWhateverTheThreads) {
  auto items = MakeItems(60);
  auto o1 = Options(6);
  o1.num_threads = 1;
  auto o3 = Options(6);
  o3.num_threads = 3;
  auto a = Loader::Create(items, EncodingClip(), o1);
  auto b = Loader::Create(items, EncodingClip(), o3);
  ASSERT_TRUE(a.ok() && b.ok());
  auto ba = DrainEpoch(**a, 1), bb = DrainEpoch(**b, 1);
  ASSERT_EQ(ba.size(), bb.size());
  for (size_t i = 0; i < ba.size(); ++i) EXPECT_TRUE(at::equal(ba[i].waveforms, bb[i].waveforms));
}

TEST(LoaderTest, BrokenTrainingClipsAreSubstitutedAndCounted) {
  auto items = MakeItems(40);
  std::set<std::string> broken{"item3", "item4", "item17"};
  auto l = Loader::Create(items, EncodingClip(broken), Options(8));
  ASSERT_TRUE(l.ok());
  auto batches = DrainEpoch(**l, 0);
  ASSERT_EQ(batches.size(), 5u);
  for (const Batch& b : batches) {
    EXPECT_EQ(b.waveforms.size(0), 8);  // batches keep their size
    for (int64_t item : b.items) EXPECT_FALSE(broken.count(items[item].path)) << item;
    ExpectRowsHoldTheirItems(b);  // each row holds its substitute's clip
  }
  EXPECT_EQ((*l)->Stats().problems.at("truncated"), 3);
  // The substitutes are deterministic.
  auto again = Loader::Create(items, EncodingClip(broken), Options(8));
  auto batches2 = DrainEpoch(**again, 0);
  for (size_t i = 0; i < batches.size(); ++i) EXPECT_EQ(batches[i].items, batches2[i].items);
}

// Half the items broken, so that broken items meet in the epoch's order: each is counted once,
// as its own row's problem, not again when a row before it tried it as a substitute.
TEST(LoaderTest, EachBrokenItemIsCountedOnceAlsoWhenSubstitutesAreBroken) {
  auto items = MakeItems(40);
  std::set<std::string> broken;
  for (int i = 0; i < 40; i += 2) broken.insert("item" + std::to_string(i));
  for (int i = 1; i < 8; i += 2) broken.insert("item" + std::to_string(i));  // runs of broken items
  auto l = Loader::Create(items, EncodingClip(broken), Options(8));
  ASSERT_TRUE(l.ok());
  auto batches = DrainEpoch(**l, 0);
  ASSERT_EQ(batches.size(), 5u);
  for (const Batch& b : batches) {
    for (int64_t item : b.items) EXPECT_FALSE(broken.count(items[item].path)) << item;
  }
  EXPECT_EQ((*l)->Stats().problems.at("truncated"), static_cast<int64_t>(broken.size()));
}

TEST(LoaderTest, BrokenValidationClipsAreLeftOut) {
  auto items = MakeItems(10);
  auto l = Loader::Create(items, EncodingClip({"item2"}), Options(4, 0, 1, false));
  ASSERT_TRUE(l.ok());
  auto batches = DrainEpoch(**l, 0);
  ASSERT_EQ(batches.size(), 3u);
  EXPECT_EQ(batches[0].waveforms.size(0), 3);
  EXPECT_EQ(batches[0].items, (std::vector<int64_t>{0, 1, 3}));
  ExpectRowsHoldTheirItems(batches[0]);  // the rows after the left-out one moved up
  EXPECT_EQ(batches[0].targets[2].item<int64_t>(), 3);
  EXPECT_EQ(batches[2].waveforms.size(0), 2);
}

TEST(LoaderTest, TooManyBrokenClipsInARowFailTheEpochWithTheirNames) {
  auto items = MakeItems(16);
  std::set<std::string> all;
  for (const auto& i : items) all.insert(i.path);
  auto o = Options(4);
  o.max_substitutions = 5;
  auto l = Loader::Create(items, EncodingClip(all), o);
  ASSERT_TRUE(l.ok());
  (*l)->StartEpoch(0);
  Batch b;
  auto r = (*l)->Next(&b);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find("5 broken clips in a row"), absl::string_view::npos);
}

// A batch that is ready is delivered although a later, prefetched one has failed the epoch: the
// failure comes at the first batch that cannot be had (it came at once, so the step where an
// epoch failed hung on prefetch timing, and steps that were ready were lost).
TEST(LoaderTest, ReadyBatchesComeBeforeALaterBatchsError) {
  auto items = MakeItems(32);
  auto o = Options(4);
  o.num_threads = 1;
  o.prefetch_batches = 2;
  o.max_substitutions = 5;
  o.seed = 7;
  common::LegacyRandomState rng(o.seed + 0);
  const std::vector<int64_t> order = rng.Permutation(static_cast<int64_t>(items.size()));
  std::set<std::string> broken;  // every item but batch 0's
  for (size_t i = 4; i < order.size(); ++i) broken.insert(items[order[i]].path);
  auto calls = std::make_shared<std::atomic<int>>(0);
  ClipFn clip = [calls, inner = EncodingClip(broken)](const LoaderItem& item, bool train, uint64_t seed,
                                                        absl::Span<float> out) {
    ClipData c = inner(item, train, seed, out);
    ++*calls;
    return c;
  };
  auto l = Loader::Create(items, clip, o);
  ASSERT_TRUE(l.ok()) << l.status();
  (*l)->StartEpoch(0);
  // Batch 0's 4 clips, then batch 1's first row and its 4 substitutes fail the epoch.
  for (int i = 0; i < 2000 && calls->load() < 9; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(calls->load(), 9);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the error recorded (else: a pass anyway)
  Batch b;
  auto first = (*l)->Next(&b);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(*first);
  EXPECT_EQ(b.index, 0);
  ExpectRowsHoldTheirItems(b);
  auto second = (*l)->Next(&b);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kDataLoss) << second.status();
}

// Once a row's substitutions fail the epoch, the rows other threads are substituting give up
// at their next attempt rather than making all of theirs (each may be slow on failing storage,
// and the loader's destructor waits for them).
TEST(LoaderTest, OtherRowsStopSubstitutingOnceTheEpochFailed) {
  auto items = MakeItems(64);
  auto o = Options(8);
  o.num_threads = 2;
  o.max_substitutions = 32;
  auto calls = std::make_shared<std::atomic<int>>(0);
  auto fast_thread = std::make_shared<std::atomic<std::thread::id>>(std::thread::id());
  auto slow_started = std::make_shared<std::atomic<bool>>(false);
  ClipFn broken = [calls, fast_thread, slow_started](const LoaderItem& item, bool, uint64_t, absl::Span<float> out) {
    // The first thread to ask breaks its clips at once, once the other is substituting too; the
    // other slowly (failing storage).
    std::thread::id none;
    fast_thread->compare_exchange_strong(none, std::this_thread::get_id());
    if (fast_thread->load() != std::this_thread::get_id()) {
      *slow_started = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    } else {
      for (int i = 0; i < 1000 && !*slow_started; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ++*calls;
    std::fill(out.begin(), out.end(), -7.0f);
    ClipData c;
    c.problem = "truncated";
    c.message = item.path + ": truncated";
    return c;
  };
  {
    auto l = Loader::Create(items, broken, o);
    ASSERT_TRUE(l.ok());
    (*l)->StartEpoch(0);
    Batch b;
    auto r = (*l)->Next(&b);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  }  // the threads joined
  // 32 of the failing row; the slow row's attempt under way (a few at most), not its 32.
  EXPECT_GE(calls->load(), 32);
  EXPECT_LT(calls->load(), 32 + 16);
}

// A clip whose read fails now for the first `failures` calls per item in `flaky` (an I/O error
// on a network share), then succeeds; `unreadable` items never read (an unmounted share).
ClipFn FlakyClip(std::set<std::string> flaky, int failures, std::set<std::string> unreadable = {}) {
  auto calls = std::make_shared<std::map<std::string, std::atomic<int>>>();
  for (const auto& f : flaky) (*calls)[f] = 0;
  return [=](const LoaderItem& item, bool train, uint64_t seed, absl::Span<float> out) {
    const bool failing = unreadable.count(item.path) || (flaky.count(item.path) && (*calls)[item.path]++ < failures);
    if (!failing) return EncodingClip()(item, train, seed, out);
    std::fill(out.begin(), out.end(), -7.0f);
    ClipData c;
    c.problem = "missing";
    c.message = item.path + ": reading failed after 0 frames: Input/output error";
    c.unreadable = true;
    c.retry = unreadable.count(item.path) == 0;
    return c;
  };
}

TEST(LoaderTest, AReadThatFailsNowIsMadeAgainAndTheBatchIsUnchanged) {
  auto items = MakeItems(40);
  auto o = Options(8);
  o.read_retry_delays_s = {0, 0, 0};
  auto clean = Loader::Create(items, EncodingClip(), o);
  auto flaky = Loader::Create(items, FlakyClip({"item3", "item17"}, 2), o);
  ASSERT_TRUE(clean.ok() && flaky.ok());
  auto want = DrainEpoch(**clean, 0);
  auto got = DrainEpoch(**flaky, 0);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].items, want[i].items);  // no substitute: the same items and crops
    EXPECT_TRUE(at::equal(got[i].waveforms, want[i].waveforms)) << "batch " << i;
  }
  const LoaderStats stats = (*flaky)->Stats();
  EXPECT_TRUE(stats.problems.empty());
  EXPECT_EQ(stats.read_retries, 4);
  EXPECT_NE(stats.read_retry_example.find("Input/output error"), std::string::npos);
  // Past the retries it is broken, substituted as any other.
  auto stubborn = Loader::Create(items, FlakyClip({"item3"}, 10), o);
  ASSERT_TRUE(stubborn.ok());
  for (const Batch& b : DrainEpoch(**stubborn, 0)) {
    for (int64_t item : b.items) EXPECT_NE(items[item].path, "item3");
  }
  EXPECT_EQ((*stubborn)->Stats().problems.at("missing"), 1);
  EXPECT_EQ((*stubborn)->Stats().read_retries, 3);
  o.read_retry_delays_s = {-1};
  auto bad = Loader::Create(items, EncodingClip(), o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("read_retry_delays_s = -1"), absl::string_view::npos) << bad.status();
}

TEST(LoaderTest, AStopCutsTheWaitBeforeAReadIsMadeAgain) {
  // Ten minutes before the next read: destroying the loader (a preemption's stop) and a new
  // epoch must not wait for it (without the cut this test hangs until its timeout).
  auto items = MakeItems(16);
  auto o = Options(4);
  o.read_retry_delays_s = {600};
  auto failed_reads = std::make_shared<std::atomic<int>>(0);
  ClipFn flaky = [failed_reads](const LoaderItem& item, bool, uint64_t, absl::Span<float> out) {
    std::fill(out.begin(), out.end(), 0.0f);
    ++*failed_reads;
    ClipData c;
    c.problem = "missing";
    c.message = item.path + ": Input/output error";
    c.unreadable = c.retry = true;
    return c;
  };
  auto l = Loader::Create(items, flaky, o);
  ASSERT_TRUE(l.ok());
  (*l)->StartEpoch(0);
  while (*failed_reads < 2) std::this_thread::sleep_for(std::chrono::milliseconds(5));  // both threads wait
  (*l)->StartEpoch(1);  // a new epoch: the waits for epoch 0's rows end
  l->reset();           // and a stop: the waits for epoch 1's rows end
}

TEST(LoaderTest, NoClipReadableInARowIsUnavailableNotDataLoss) {
  // The storage failed (an unmounted share: "no such file" everywhere, no retry), not the
  // files: a retryable UNAVAILABLE, while broken contents stay DATA_LOSS (above).
  auto items = MakeItems(16);
  std::set<std::string> all;
  for (const auto& i : items) all.insert(i.path);
  auto o = Options(4);
  o.max_substitutions = 5;
  auto l = Loader::Create(items, FlakyClip({}, 0, all), o);
  ASSERT_TRUE(l.ok());
  (*l)->StartEpoch(0);
  Batch b;
  auto r = (*l)->Next(&b);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_NE(r.status().message().find("5 broken clips in a row"), absl::string_view::npos);
  EXPECT_NE(r.status().message().find("none could be read"), absl::string_view::npos);
}

TEST(LoaderTest, ValidationThatCannotReadItsClipsIsUnavailableNotASubset) {
  // Validation leaves a broken clip out; but clip after clip that cannot be read is the storage
  // (a share gone away), and metrics over what is left would measure another set: UNAVAILABLE,
  // without every row's read retries (each a wait: past 3 such rows, none).
  auto items = MakeItems(40);
  std::set<std::string> flaky;
  for (const auto& i : items) flaky.insert(i.path);
  auto o = Options(4, 0, 1, /*train=*/false);
  o.max_substitutions = 30;
  o.read_retry_delays_s = {0, 0, 0};
  auto calls = std::make_shared<std::atomic<int>>(0);
  ClipFn failing = FlakyClip(flaky, 1000);
  auto l = Loader::Create(
      items,
      [calls, failing](const LoaderItem& item, bool train, uint64_t seed, absl::Span<float> out) {
        ++*calls;
        return failing(item, train, seed, out);
      },
      o);
  ASSERT_TRUE(l.ok());
  (*l)->StartEpoch(0);
  Batch b;
  absl::StatusOr<bool> r = true;
  while (r.ok() && *r) r = (*l)->Next(&b);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_NE(r.status().message().find("30 validation clips in a row could not be read (last: item"),
            absl::string_view::npos)
      << r.status();
  // 4 reads for the first rows (2 threads: at most 5 before the third left out), 1 for the rest:
  // about 50, where every row's retries make 120.
  l->reset();
  EXPECT_LT(calls->load(), 70);
  // A few unreadable clips among readable ones are left out, as any broken clip.
  auto some = Loader::Create(items, FlakyClip({}, 0, {"item3", "item4", "item20"}), o);
  ASSERT_TRUE(some.ok());
  int64_t rows = 0;
  for (const Batch& batch : DrainEpoch(**some, 0)) rows += static_cast<int64_t>(batch.items.size());
  EXPECT_EQ(rows, 37);
  EXPECT_EQ((*some)->Stats().problems.at("missing"), 3);
}

TEST(LoaderTest, RestartingAnEpochMidwayStartsClean) {
  auto items = MakeItems(64);
  auto l = Loader::Create(items, EncodingClip(), Options(4));
  ASSERT_TRUE(l.ok());
  (*l)->StartEpoch(0);
  Batch b;
  ASSERT_TRUE(*(*l)->Next(&b));
  auto batches = DrainEpoch(**l, 1);
  EXPECT_EQ(batches.size(), 16u);
  EXPECT_EQ(batches[0].items, (*l)->Plan(1)[0]);
}

TEST(LoaderTest, StartingTheEpochAgainBeforeItsFirstBatchKeepsTheWorkDone) {
  // A trainer starts epoch 1 ahead (during epoch 0's validation) and again when it begins: the
  // batches decoded meanwhile are kept, and they are the batches a fresh start would give.
  auto items = MakeItems(64);
  std::atomic<int> calls{0};
  ClipFn inner = EncodingClip();
  ClipFn counted = [&](const LoaderItem& item, bool train, uint64_t seed, absl::Span<float> out) {
    ++calls;
    return inner(item, train, seed, out);
  };
  auto o = Options(4);
  auto l = Loader::Create(items, counted, o);
  ASSERT_TRUE(l.ok());
  (*l)->StartEpoch(1);
  for (int i = 0; i < 2000 && (*l)->QueueDepth() < o.prefetch_batches; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ((*l)->QueueDepth(), o.prefetch_batches);
  const int ahead = calls.load();
  EXPECT_EQ(ahead, o.prefetch_batches * o.batch_size);
  auto batches = DrainEpoch(**l, 1);  // StartEpoch(1) again, then every batch
  EXPECT_EQ(calls.load(), 64);        // no row decoded twice
  auto fresh = Loader::Create(items, EncodingClip(), o);
  ASSERT_TRUE(fresh.ok());
  auto expected = DrainEpoch(**fresh, 1);
  ASSERT_EQ(batches.size(), expected.size());
  for (size_t i = 0; i < batches.size(); ++i) {
    EXPECT_EQ(batches[i].items, expected[i].items);
    EXPECT_TRUE(batches[i].waveforms.equal(expected[i].waveforms)) << "batch " << i;
  }
  // Once a batch is taken, starting the epoch again starts it over.
  (*l)->StartEpoch(2);
  Batch b;
  ASSERT_TRUE(*(*l)->Next(&b));
  batches = DrainEpoch(**l, 2);
  ASSERT_EQ(batches.size(), 16u);
  EXPECT_EQ(batches[0].index, 0);
  EXPECT_EQ(batches[0].items, (*l)->Plan(2)[0]);
}

TEST(LoaderTest, MaxBatchesAndRemainderPadding) {
  auto items = MakeItems(21);
  auto o = Options(4, 1, 2);
  o.drop_remainder = false;
  auto l = Loader::Create(items, EncodingClip(), o);
  ASSERT_TRUE(l.ok());
  auto plan = (*l)->Plan(0);
  ASSERT_EQ(plan.size(), 3u);      // 2 full global batches of 8, then 5 left
  EXPECT_EQ(plan[2].size(), 3u);   // ceil(5 / 2): padded from the start of the order
  o.max_batches = 1;
  auto capped = Loader::Create(items, EncodingClip(), o);
  EXPECT_EQ((*capped)->BatchesPerEpoch(), 1);
}

TEST(LoaderTest, BadOptionsAreNamed) {
  auto items = MakeItems(8);
  auto o = Options(4);
  o.rank = 2;
  auto l = Loader::Create(items, EncodingClip(), o);
  ASSERT_FALSE(l.ok());
  EXPECT_NE(l.status().message().find("rank = 2"), absl::string_view::npos);
  auto big = Loader::Create(items, EncodingClip(), Options(16));
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("fewer than one global batch"), absl::string_view::npos);
  items[3].target = 9;
  auto t = Loader::Create(items, EncodingClip(), Options(4));
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("item 3 (item3) has target 9"), absl::string_view::npos);
  EXPECT_FALSE(Loader::Create({}, EncodingClip(), Options(4)).ok());
  auto none = Options(4);
  none.max_substitutions = 0;  // the first broken clip failed the epoch
  auto s = Loader::Create(MakeItems(8), EncodingClip(), none);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("max_substitutions = 0: must be >= 1"), absl::string_view::npos) << s.status();
}

TEST(LoaderTest, EveryThreadDecodesRowsOfTheBatchInProgress) {
  // One batch at a time (prefetch_batches 1) and 4 threads: the clips of that batch are decoded
  // concurrently (a loader that gave each batch to one thread would decode one clip at a time).
  auto items = MakeItems(48);
  std::atomic<int> now{0}, most{0};
  ClipFn inner = EncodingClip();
  ClipFn slow = [&](const LoaderItem& item, bool train, uint64_t seed, absl::Span<float> out) {
    const int n = ++now;
    int m = most.load();
    while (n > m && !most.compare_exchange_weak(m, n)) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    --now;
    return inner(item, train, seed, out);
  };
  auto o = Options(8);
  o.num_threads = 4;
  o.prefetch_batches = 1;
  auto l = Loader::Create(items, slow, o);
  ASSERT_TRUE(l.ok());
  auto batches = DrainEpoch(**l, 2);
  ASSERT_EQ(batches.size(), 6u);
  const auto plan = (*l)->Plan(2);
  for (size_t i = 0; i < batches.size(); ++i) {
    EXPECT_EQ(batches[i].index, static_cast<int64_t>(i));
    EXPECT_EQ(batches[i].items, plan[i]);
    ExpectRowsHoldTheirItems(batches[i]);
  }
  EXPECT_GE(most.load(), 2);
}

// Under a thread limit (RLIMIT_NPROC, EAGAIN) the loader starts the threads it can and works
// with them; with none, Create says so (a started thread left unjoined ended the process). Run
// in a child process as uid 65534 when root (root is not held to the limit).
TEST(LoaderTest, AThreadLimitGivesFewerThreadsOrAClearError) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (::geteuid() == 0 && (::setgroups(0, nullptr) != 0 || ::setresgid(65534, 65534, 65534) != 0 ||
                             ::setresuid(65534, 65534, 65534) != 0)) {
      ::_exit(3);
    }
    const rlimit limit{64, 64};
    if (::setrlimit(RLIMIT_NPROC, &limit) != 0) ::_exit(3);
    // Threads that hold every slot left under the limit; each ticket lets one of them end.
    std::mutex mu;
    std::condition_variable cv;
    int tickets = 0, ended = 0;
    std::vector<std::thread> holders;
    auto hold = [&] {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return tickets > 0; });
      --tickets;
      ++ended;
      cv.notify_all();
    };
    try {
      while (holders.size() < 80) holders.emplace_back(hold);
    } catch (const std::system_error&) {
    }
    auto let_go = [&](int n) {  // returns when n more have ended
      std::unique_lock<std::mutex> lock(mu);
      const int want = ended + n;
      tickets += n;
      cv.notify_all();
      cv.wait(lock, [&] { return ended >= want; });
    };
    auto let_all_go = [&] {
      let_go(static_cast<int>(holders.size()) - ended);
      for (std::thread& t : holders) t.join();
    };
    if (holders.size() < 2 || holders.size() >= 80) {
      let_all_go();
      ::_exit(3);  // the limit did not shape the threads here
    }
    int failed = 0;
    auto o = Options(8);
    o.num_threads = 4;
    // RLIMIT_NPROC counts every thread of the uid on the machine: a slot freed elsewhere
    // meanwhile (another process of uid 65534 ending) lets a thread start; that run says
    // nothing (3: skipped), as one whose freed slots another process takes.
    auto none = Loader::Create(MakeItems(40), EncodingClip(), o);
    if (none.ok()) {
      none->reset();
      let_all_go();
      ::_exit(3);
    }
    if (!absl::IsResourceExhausted(none.status()) ||
        none.status().message().find("cannot start a decode thread") == std::string::npos) {
      std::fprintf(stderr, "no thread: %s\n", none.ok() ? "created" : std::string(none.status().message()).c_str());
      failed = 1;
    }
    let_go(2);  // two slots free, once the kernel has counted the two threads' exits
    auto some = Loader::Create(MakeItems(40), EncodingClip(), o);
    for (int tries = 0; tries < 100 && absl::IsResourceExhausted(some.status()); ++tries) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      some = Loader::Create(MakeItems(40), EncodingClip(), o);
    }
    if (absl::IsResourceExhausted(some.status())) {
      let_all_go();
      ::_exit(failed != 0 ? failed : 3);  // the two slots went to another process
    }
    if (!some.ok()) {
      std::fprintf(stderr, "two threads free: %s\n", std::string(some.status().message()).c_str());
      failed = 1;
    } else {
      (*some)->StartEpoch(1);
      Batch b;
      int batches = 0;
      while (true) {
        auto more = (*some)->Next(&b);
        if (!more.ok() || !*more) {
          if (!more.ok()) failed = 1;
          break;
        }
        for (int64_t r = 0; r < b.waveforms.size(0); ++r) {
          if (b.waveforms[r][0].item<float>() != static_cast<float>(b.items[r])) failed = 1;
        }
        ++batches;
      }
      if (batches != 5) failed = 1;
      some->reset();
    }
    let_all_go();
    ::_exit(failed);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 3) {
    GTEST_SKIP() << "could not hold this process to a thread limit (or another process of its uid moved it)";
  }
  EXPECT_EQ(WEXITSTATUS(status), 0) << "see stderr";
}

TEST(LoaderTest, ANewEpochStartedMidwayDropsTheRowsInFlight) {
  // Slow clips and 4 threads: when epoch 1 starts from batch 1 right after epoch 0's first
  // batch, epoch 0's batches 1.. are still being decoded; none of their rows may reach epoch
  // 1's batches of the same numbers (other items).
  auto items = MakeItems(64);
  ClipFn inner = EncodingClip();
  ClipFn slow = [&](const LoaderItem& item, bool train, uint64_t seed, absl::Span<float> out) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
    return inner(item, train, seed, out);
  };
  auto o = Options(4);
  o.num_threads = 4;
  auto l = Loader::Create(items, slow, o);
  ASSERT_TRUE(l.ok());
  (*l)->StartEpoch(0);
  Batch b;
  ASSERT_TRUE(*(*l)->Next(&b));
  (*l)->StartEpoch(1, 1);
  std::vector<Batch> batches;
  while (true) {
    auto more = (*l)->Next(&b);
    ASSERT_TRUE(more.ok()) << more.status();
    if (!*more) break;
    EXPECT_LE((*l)->QueueDepth(), o.prefetch_batches);
    batches.push_back(b);
  }
  const auto plan = (*l)->Plan(1);
  ASSERT_NE(plan[1], (*l)->Plan(0)[1]);
  ASSERT_EQ(batches.size(), plan.size() - 1);
  for (size_t i = 0; i < batches.size(); ++i) {
    EXPECT_EQ(batches[i].index, static_cast<int64_t>(i + 1));
    EXPECT_EQ(batches[i].items, plan[i + 1]);
    ExpectRowsHoldTheirItems(batches[i]);
  }
}

TEST(LoaderTest, AFailedEpochLeavesTheThreadsReadyForTheNext) {
  // Every clip broken: the epoch fails (several threads meet the error); the next epoch, with
  // the files fixed, runs whole.
  auto items = MakeItems(32);
  std::atomic<bool> broken{true};
  ClipFn inner = EncodingClip();
  ClipFn flaky = [&](const LoaderItem& item, bool train, uint64_t seed, absl::Span<float> out) {
    if (broken.load()) return ClipData{"truncated", item.path + ": truncated"};
    return inner(item, train, seed, out);
  };
  auto o = Options(4);
  o.num_threads = 4;
  o.max_substitutions = 3;
  auto l = Loader::Create(items, flaky, o);
  ASSERT_TRUE(l.ok());
  (*l)->StartEpoch(0);
  Batch b;
  auto r = (*l)->Next(&b);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  broken = false;
  auto batches = DrainEpoch(**l, 1);
  ASSERT_EQ(batches.size(), 8u);
  for (const Batch& batch : batches) EXPECT_EQ(batch.waveforms.size(0), 4);
}

// DeviceCopier (worker/device_copy.h): on the CPU the batch's own tensor comes back; on CUDA the
// copy started ahead, on its own stream while the compute stream is busy, is what the work
// queued after Take() reads. The CUDA half is skipped without a GPU (CI has none).
TEST(DeviceCopierTest, CopiesAheadOrHandsTheHostTensorBack) {
  DeviceCopier cpu(c10::Device(c10::kCPU));
  EXPECT_FALSE(cpu.overlaps());
  const at::Tensor host = at::arange(12, at::kFloat).reshape({3, 4});
  EXPECT_TRUE(cpu.Take(cpu.Start(host)).is_same(host));
  EXPECT_EQ(cpu.Mark(), nullptr);  // nothing to wait for on the CPU
  DeviceCopier::Await(nullptr);
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device here: the copy stream is not exercised";
  const c10::Device gpu(c10::kCUDA, 0);
  DeviceCopier copier(gpu);
  EXPECT_TRUE(copier.overlaps());
  // 256 MB: the copy takes milliseconds, and the work queued right after Take() reads it at
  // once; without the wait for the copy's event it would read memory not yet written.
  const at::Tensor pinned = at::randn({256, 262144}).pin_memory();
  DeviceCopier::InFlight in_flight = copier.Start(pinned);
  const at::Tensor x = copier.Take(std::move(in_flight));
  EXPECT_TRUE(x.is_cuda());
  EXPECT_TRUE(at::equal((x * 2).cpu(), pinned * 2));
  // A mark after queued work: awaited, the work's result is there.
  const at::Tensor y = x * 3;
  const std::shared_ptr<DeviceCopier::Event> mark = copier.Mark();
  ASSERT_NE(mark, nullptr);
  DeviceCopier::Await(mark);
  EXPECT_TRUE(at::equal(y.cpu(), pinned * 3));
}

}  // namespace
}  // namespace aviary::worker
