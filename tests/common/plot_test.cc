#include "common/plot.h"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "common/csv.h"
#include "common/files.h"
#include "gtest/gtest.h"

namespace aviary::common {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A decoded 8-bit RGB PNG.
struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;

  uint32_t At(int x, int y) const {
    const uint8_t* p = &rgb[(static_cast<size_t>(y) * width + x) * 3];
    return (uint32_t{p[0]} << 16) | (uint32_t{p[1]} << 8) | p[2];
  }
  int Count(uint32_t color) const {
    int n = 0;
    for (int y = 0; y < height; ++y) {
      for (int x = 0; x < width; ++x) n += At(x, y) == color;
    }
    return n;
  }
};

int Channel(uint32_t rgb, int c) { return (rgb >> (16 - 8 * c)) & 0xFF; }

// Text pixels: dark and grey (the text colour is 0x262626, blended into white at glyph edges).
bool IsInk(uint32_t rgb) {
  int r = Channel(rgb, 0), g = Channel(rgb, 1), b = Channel(rgb, 2);
  return r < 0xC0 && std::abs(r - g) <= 2 && std::abs(g - b) <= 2;
}

struct Bounds {
  int x0 = std::numeric_limits<int>::max(), y0 = std::numeric_limits<int>::max(), x1 = -1, y1 = -1;
  int count = 0;
  bool empty() const { return count == 0; }
  int width() const { return x1 - x0 + 1; }
  int height() const { return y1 - y0 + 1; }
};

// The bounding box of the pixels in [x0, x1) x [y0, y1) that satisfy `pred`.
template <typename Pred>
Bounds Find(const Image& image, int x0, int y0, int x1, int y1, Pred pred) {
  Bounds b;
  for (int y = std::max(0, y0); y < std::min(image.height, y1); ++y) {
    for (int x = std::max(0, x0); x < std::min(image.width, x1); ++x) {
      if (!pred(image.At(x, y))) continue;
      b.x0 = std::min(b.x0, x);
      b.y0 = std::min(b.y0, y);
      b.x1 = std::max(b.x1, x);
      b.y1 = std::max(b.y1, y);
      ++b.count;
    }
  }
  return b;
}

uint32_t ReadU32(const std::string& s, size_t at) {
  return (uint32_t{static_cast<uint8_t>(s[at])} << 24) |
         (uint32_t{static_cast<uint8_t>(s[at + 1])} << 16) |
         (uint32_t{static_cast<uint8_t>(s[at + 2])} << 8) |
         uint32_t{static_cast<uint8_t>(s[at + 3])};
}

int Paeth(int a, int b, int c) {
  int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

// Decodes the 8-bit RGB PNGs that cairo writes for plot.cc, checking the signature, every chunk
// CRC, the IHDR fields and that the IDAT stream inflates to exactly height * (1 + 3 * width) bytes.
::testing::AssertionResult Decode(const std::string& png, Image* out) {
  if (png.size() < 8 || png.compare(0, 8, std::string("\x89PNG\r\n\x1a\n", 8)) != 0) {
    return ::testing::AssertionFailure() << "bad PNG signature";
  }
  std::string idat;
  bool have_ihdr = false, have_iend = false;
  size_t at = 8;
  while (at < png.size()) {
    if (at + 12 > png.size()) return ::testing::AssertionFailure() << "truncated chunk at " << at;
    uint32_t len = ReadU32(png, at);
    std::string type = png.substr(at + 4, 4);
    if (at + 12 + len > png.size()) return ::testing::AssertionFailure() << type << " overruns";
    std::string data = png.substr(at + 8, len);
    uLong crc = crc32(0L, reinterpret_cast<const Bytef*>(type.data()), 4);
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data.data()), static_cast<uInt>(len));
    if (ReadU32(png, at + 8 + len) != crc) {
      return ::testing::AssertionFailure() << "bad CRC on chunk " << type;
    }
    if (type == "IHDR") {
      if (len != 13) return ::testing::AssertionFailure() << "IHDR length " << len;
      out->width = static_cast<int>(ReadU32(data, 0));
      out->height = static_cast<int>(ReadU32(data, 4));
      if (data.substr(8) != std::string("\x08\x02\x00\x00\x00", 5)) {
        return ::testing::AssertionFailure() << "IHDR is not 8-bit RGB, non-interlaced";
      }
      have_ihdr = true;
    } else if (type == "IDAT") {
      idat += data;
    } else if (type == "IEND") {
      have_iend = true;
      if (at + 12 + len != png.size()) return ::testing::AssertionFailure() << "bytes after IEND";
    }
    at += 12 + len;
  }
  if (!have_ihdr || !have_iend || idat.empty()) {
    return ::testing::AssertionFailure() << "missing IHDR, IDAT or IEND";
  }
  const size_t stride = 1 + 3 * static_cast<size_t>(out->width);
  const size_t expected = stride * out->height;
  std::vector<uint8_t> raw(expected + 16);
  uLongf raw_size = raw.size();
  int rc =
      uncompress(raw.data(), &raw_size, reinterpret_cast<const Bytef*>(idat.data()), idat.size());
  if (rc != Z_OK) return ::testing::AssertionFailure() << "IDAT does not inflate: " << rc;
  if (raw_size != expected) {
    return ::testing::AssertionFailure()
           << "IDAT inflates to " << raw_size << " bytes, expected " << expected;
  }
  out->rgb.assign(expected - out->height, 0);
  const size_t row = 3 * static_cast<size_t>(out->width);
  for (int y = 0; y < out->height; ++y) {
    const uint8_t filter = raw[y * stride];
    const uint8_t* in = &raw[y * stride + 1];
    uint8_t* cur = &out->rgb[y * row];
    const uint8_t* prev = y > 0 ? &out->rgb[(y - 1) * row] : nullptr;
    for (size_t i = 0; i < row; ++i) {
      int a = i >= 3 ? cur[i - 3] : 0, b = prev ? prev[i] : 0, c = prev && i >= 3 ? prev[i - 3] : 0;
      int pred = filter == 0   ? 0
                 : filter == 1 ? a
                 : filter == 2 ? b
                 : filter == 3 ? (a + b) / 2
                               : Paeth(a, b, c);
      if (filter > 4) return ::testing::AssertionFailure() << "bad filter " << int{filter};
      cur[i] = static_cast<uint8_t>(in[i] + pred);
    }
  }
  return ::testing::AssertionSuccess();
}

Image RenderOrDie(const Figure& figure) {
  absl::StatusOr<std::string> png = RenderPng(figure);
  Image image;
  EXPECT_TRUE(png.ok()) << png.status();
  if (png.ok()) EXPECT_TRUE(Decode(*png, &image));
  return image;
}

struct Span {
  int lo = std::numeric_limits<int>::max(), hi = -1;
  void Add(int v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
};

// The dataset summary figure: sources bar chart next to the class long tail.
Figure SummaryFigure() {
  Figure figure;
  figure.title = "Dataset summary: 48213 samples, 264 classes";
  Panel sources;
  sources.title = "Samples per source";
  sources.x_label = "source";
  sources.y_label = "samples";
  sources.bars =
      BarSeries{"", {"2021", "2022", "2023", "xc"}, {14210, 9876, 16941, 7186}, PaletteColor(0)};
  Panel tail;
  tail.title = "Class long tail";
  tail.x_label = "class (sorted by count)";
  tail.y_label = "samples (log)";
  tail.log_y = true;
  BarSeries bars;
  bars.rgb = PaletteColor(1);
  for (int i = 0; i < 264; ++i) {
    bars.labels.push_back(i % 3 == 0 ? "bkcchi" : i % 3 == 1 ? "houspa" : "comrav");
    bars.values.push_back(i < 260 ? std::floor(1500.0 * std::exp(-i / 40.0)) + 1 : 0);
  }
  tail.bars = bars;
  figure.panels = {sources, tail};
  return figure;
}

// A training history: AUC lines on the left axis, losses on the right one.
Figure HistoryFigure() {
  Figure figure;
  figure.width = 1000;
  figure.height = 520;
  figure.title = "run demo-0412";
  Panel panel;
  panel.title = "Training history";
  panel.x_label = "epoch";
  panel.y_label = "AUC";
  panel.y2_label = "loss";
  Series train{"train AUC", {}, {}, PaletteColor(0)};
  Series val{"val AUC", {}, {}, PaletteColor(1)};
  Series train_loss{"train loss", {}, {}, PaletteColor(2), true, true};
  Series val_loss{"val loss", {}, {}, PaletteColor(3), true, true};
  for (int e = 1; e <= 30; ++e) {
    double t = e / 30.0;
    train.x.push_back(e);
    train.y.push_back(0.97 - 0.45 * std::exp(-4 * t));
    val.x.push_back(e);
    val.y.push_back(0.9 - 0.4 * std::exp(-5 * t) - 0.08 * t * t + 0.004 * std::sin(e * 1.7));
    train_loss.x.push_back(e);
    train_loss.y.push_back(0.05 + 0.6 * std::exp(-3 * t));
    val_loss.x.push_back(e);
    val_loss.y.push_back(0.12 + 0.5 * std::exp(-4 * t) + 0.15 * t * t);
  }
  auto argbest = [](const std::vector<double>& v, bool max) {
    int best = 0;
    for (int i = 1; i < static_cast<int>(v.size()); ++i) {
      if (max ? v[i] > v[best] : v[i] < v[best]) best = i;
    }
    return best;
  };
  val.marker_index = argbest(val.y, true);
  val.marker_label = "best " + std::to_string(val.marker_index + 1);
  val_loss.marker_index = argbest(val_loss.y, false);
  panel.lines = {train, val, train_loss, val_loss};
  figure.panels = {panel};
  return figure;
}

// `aviary history --plot`: three panels (losses, validation AUC with its best marked, a log
// learning rate), one colour per task.
Figure JobHistoryFigure() {
  Panel loss, auc, lr;
  loss.title = "loss (train solid, val dashed)";
  loss.x_label = auc.x_label = lr.x_label = "epoch";
  loss.y_label = "loss";
  auc.title = "val AUC (micro PR-AUC)";
  auc.y_label = "AUC";
  lr.title = "learning rate";
  lr.y_label = "lr";
  lr.log_y = true;
  const char* tasks[] = {"pretrain", "fold0", "fold1"};
  for (int i = 0; i < 3; ++i) {
    Series train_loss, val_loss, val_auc, rate;
    train_loss.name = val_auc.name = rate.name = tasks[i];
    train_loss.rgb = val_loss.rgb = val_auc.rgb = rate.rgb = PaletteColor(i);
    val_loss.dashed = true;
    const int epochs = i == 0 ? 40 : 25;
    for (int e = 0; e < epochs; ++e) {
      const double t = static_cast<double>(e) / epochs;
      for (Series* s : {&train_loss, &val_loss, &val_auc, &rate}) s->x.push_back(e);
      train_loss.y.push_back(0.03 + (0.7 - 0.1 * i) * std::exp(-3 * t));
      val_loss.y.push_back(0.08 + (0.6 - 0.1 * i) * std::exp(-4 * t) + 0.1 * t * t);
      val_auc.y.push_back(0.55 + 0.1 * i + 0.3 * (1 - std::exp(-5 * t)) - 0.05 * t * t);
      rate.y.push_back(1e-3 * 0.5 * (1 + std::cos(3.14159265358979 * t)) + 1e-6);
    }
    val_auc.marker_index =
        static_cast<int>(std::max_element(val_auc.y.begin(), val_auc.y.end()) - val_auc.y.begin());
    val_auc.marker_label = std::to_string(val_auc.y[val_auc.marker_index]).substr(0, 6);
    loss.lines.push_back(train_loss);
    loss.lines.push_back(val_loss);
    auc.lines.push_back(val_auc);
    lr.lines.push_back(rate);
  }
  Figure figure;
  figure.width = 1800;
  figure.height = 560;
  figure.title = "job 7f3a2c";
  figure.panels = {loss, auc, lr};
  figure.columns = 3;
  return figure;
}

TEST(PlotTest, WritesValidPngWithRequestedSize) {
  Figure figure = SummaryFigure();
  figure.width = 640;
  figure.height = 360;
  absl::StatusOr<std::string> png = RenderPng(figure);
  ASSERT_TRUE(png.ok()) << png.status();
  Image image;
  ASSERT_TRUE(Decode(*png, &image));
  EXPECT_EQ(image.width, 640);
  EXPECT_EQ(image.height, 360);
  EXPECT_EQ(image.At(0, 0), 0xFFFFFFu);  // white background
}

TEST(PlotTest, EncodePngRoundTripsPixels) {
  std::string rgb;
  for (int y = 0; y < 3; ++y) {
    for (int x = 0; x < 5; ++x)
      rgb += std::string{static_cast<char>(x * 50), static_cast<char>(y * 100), 7};
  }
  absl::StatusOr<std::string> png = EncodePng(5, 3, rgb);
  ASSERT_TRUE(png.ok()) << png.status();
  Image image;
  ASSERT_TRUE(Decode(*png, &image));
  EXPECT_EQ(std::string(image.rgb.begin(), image.rgb.end()), rgb);
  EXPECT_EQ(EncodePng(5, 3, "short").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PlotTest, BarHeightsFollowValues) {
  Figure figure;
  figure.width = 600;
  figure.height = 400;
  Panel panel;
  panel.bars = BarSeries{"", {"a", "b", "c"}, {10, 20, 30}, 0x2266AA, false};
  figure.panels = {panel};
  Image image = RenderOrDie(figure);
  ASSERT_GT(image.width, 0);
  // Runs of columns holding the bar colour, and each run's vertical extent.
  std::vector<Span> columns, rows;
  bool in_bar = false;
  for (int x = 0; x < image.width; ++x) {
    Span col;
    for (int y = 0; y < image.height; ++y) {
      if (image.At(x, y) == 0x2266AAu) col.Add(y);
    }
    if (col.hi < 0) {
      in_bar = false;
      continue;
    }
    if (!in_bar) {
      columns.emplace_back();
      rows.emplace_back();
    }
    in_bar = true;
    columns.back().Add(x);
    rows.back().Add(col.lo);
    rows.back().Add(col.hi);
  }
  ASSERT_EQ(columns.size(), 3u);
  double h[3];
  for (int i = 0; i < 3; ++i) {
    h[i] = rows[i].hi - rows[i].lo + 1;
    EXPECT_NEAR(rows[i].hi, rows[0].hi, 1) << "bars share a baseline";
    EXPECT_GT(columns[i].hi - columns[i].lo, 50) << "bar " << i << " is wide";
  }
  EXPECT_NEAR(h[1] / h[0], 2.0, 0.05);
  EXPECT_NEAR(h[2] / h[0], 3.0, 0.05);
  // The bars are spread over the plot, left to right, below the middle of the tallest.
  EXPECT_LT(columns[0].hi, image.width / 3);
  EXPECT_GT(columns[2].lo, 2 * image.width / 3 - 40);
  EXPECT_GT(rows[0].lo, image.height / 2);
}

TEST(PlotTest, LogScaleBarsAreEvenlySpacedPerDecadeAndSkipZeros) {
  Figure figure;
  figure.width = 600;
  figure.height = 400;
  Panel panel;
  panel.log_y = true;
  panel.bars = BarSeries{"", {}, {0, 10, 100, 1000}, 0x2266AA, false};
  figure.panels = {panel};
  Image image = RenderOrDie(figure);
  std::vector<int> heights;
  bool in_bar = false;
  for (int x = 0; x < image.width; ++x) {
    int n = 0;
    for (int y = 0; y < image.height; ++y) n += image.At(x, y) == 0x2266AAu;
    if (n == 0) {
      in_bar = false;
      continue;
    }
    if (!in_bar) heights.push_back(0);
    in_bar = true;
    heights.back() = std::max(heights.back(), n);
  }
  ASSERT_EQ(heights.size(), 3u) << "the zero bar is not drawn";
  EXPECT_NEAR(heights[1] - heights[0], heights[2] - heights[1], 2);
  EXPECT_GT(heights[0], 10);
}

TEST(PlotTest, LinesUseTheirOwnAxis) {
  Figure figure;
  figure.width = 600;
  figure.height = 400;
  Panel panel;
  panel.legend = false;
  // Rising on the left axis (0..1); falling on the right axis (1000..0).
  panel.lines.push_back(Series{"up", {0, 1, 2, 3}, {0, 0.33, 0.66, 1}, 0xD62728});
  panel.lines.push_back(Series{"down", {0, 1, 2, 3}, {1000, 660, 330, 0}, 0x2CA02C, true});
  figure.panels = {panel};
  Image image = RenderOrDie(figure);
  for (auto [color, rising] : {std::pair<uint32_t, bool>{0xD62728, true}, {0x2CA02C, false}}) {
    Span xs;
    for (int y = 0; y < image.height; ++y) {
      for (int x = 0; x < image.width; ++x) {
        if (image.At(x, y) == color) xs.Add(x);
      }
    }
    ASSERT_GE(xs.hi, 0) << std::hex << color;
    EXPECT_GT(xs.hi - xs.lo, image.width / 2);
    // Mean row of the line's pixels near its left and right ends.
    auto mean_y = [&](int x0, int x1) {
      double sum = 0;
      int n = 0;
      for (int x = x0; x <= x1; ++x) {
        for (int y = 0; y < image.height; ++y) {
          if (image.At(x, y) == color) sum += y, ++n;
        }
      }
      return sum / std::max(1, n);
    };
    int w = (xs.hi - xs.lo) / 10;
    double left = mean_y(xs.lo, xs.lo + w), right = mean_y(xs.hi - w, xs.hi);
    if (rising) {
      EXPECT_GT(left - right, image.height / 2) << "image y grows downwards";
    } else {
      EXPECT_GT(right - left, image.height / 2);
    }
  }
}

TEST(PlotTest, ToleratesDegenerateData) {
  Figure figure;
  figure.width = 800;
  figure.height = 600;
  figure.columns = 3;
  Panel empty;  // nothing at all
  Panel empty_series;
  empty_series.lines.push_back(Series{"none"});
  Panel single;
  single.lines.push_back(Series{"one", {3}, {0.5}, 0x123456, false, false, 0});
  Panel flat;
  flat.lines.push_back(Series{"flat", {1, 2, 3}, {2, 2, 2}});
  flat.log_y = true;
  Panel gaps;
  gaps.lines.push_back(Series{"gaps", {0, 1, 2, 3, kNaN, 5}, {1, kNaN, 2, 3, 4, -1}});
  gaps.log_y = true;  // -1 is skipped on a log axis
  Panel zero_bars;
  zero_bars.bars = BarSeries{"zeros", {"a", "b"}, {0, 0}};
  Panel log_zero_bars = zero_bars;
  log_zero_bars.log_y = true;
  Panel no_bars;
  no_bars.bars = BarSeries{};
  Panel negative;
  negative.bars = BarSeries{"", {"x", "y"}, {-5, 3}};
  Panel huge;  // spans that overflow a double
  huge.lines.push_back(Series{"huge", {-1e308, 1e308}, {1e308, -1e308}});
  huge.bars = BarSeries{"", {}, {1e308, -1e308, 1}};
  figure.panels = {empty,     empty_series,  single,  flat,     gaps,
                   zero_bars, log_zero_bars, no_bars, negative, huge};
  Image image = RenderOrDie(figure);
  EXPECT_EQ(image.width, 800);
  EXPECT_GT(image.Count(0x123456), 20) << "a single point is drawn as a dot";
}

TEST(PlotTest, IsDeterministic) {
  absl::StatusOr<std::string> a = RenderPng(HistoryFigure());
  absl::StatusOr<std::string> b = RenderPng(HistoryFigure());
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*a, *b);
}

TEST(PlotTest, RejectsBadFigures) {
  Figure figure = HistoryFigure();
  figure.width = 199;
  EXPECT_EQ(RenderPng(figure).status().code(), absl::StatusCode::kInvalidArgument);
  figure.width = 8001;
  EXPECT_EQ(RenderPng(figure).status().code(), absl::StatusCode::kInvalidArgument);
  figure.width = 1000;
  figure.height = 100;
  absl::Status status = RenderPng(figure).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("height 100"), absl::string_view::npos) << status;

  figure = HistoryFigure();
  figure.panels.clear();
  EXPECT_EQ(RenderPng(figure).status().code(), absl::StatusCode::kInvalidArgument);

  figure = HistoryFigure();
  figure.panels[0].lines[1].y.pop_back();
  status = RenderPng(figure).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("series 'val AUC' has 30 x values but 29 y values"),
            absl::string_view::npos)
      << status;

  figure = HistoryFigure();
  figure.panels[0].lines[0].marker_index = 30;
  status = RenderPng(figure).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("marker_index 30"), absl::string_view::npos) << status;

  figure = SummaryFigure();
  figure.panels[0].bars->labels.pop_back();
  status = RenderPng(figure).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("panel 0 ('Samples per source')"), absl::string_view::npos)
      << status;
  EXPECT_NE(status.message().find("3 labels but 4 values"), absl::string_view::npos) << status;

  figure = SummaryFigure();
  figure.panels[0].bars->rgb = 0x1000000;
  EXPECT_EQ(RenderPng(figure).status().code(), absl::StatusCode::kInvalidArgument);

  // Too many panels for the size.
  figure = SummaryFigure();
  figure.width = 200;
  figure.panels.resize(8, figure.panels[0]);
  status = RenderPng(figure).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("px wide"), absl::string_view::npos) << status;
}

TEST(PlotTest, WritePngWritesTheRenderedBytes) {
  const std::string path = ::testing::TempDir() + "/plot_test_write.png";
  ASSERT_TRUE(WritePng(SummaryFigure(), path).ok());
  absl::StatusOr<std::string> written = ReadFileToString(path);
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ(*written, *RenderPng(SummaryFigure()));
  std::remove(path.c_str());

  EXPECT_FALSE(WritePng(SummaryFigure(), "/nonexistent-dir/x.png").ok());
  EXPECT_FALSE(WritePng(Figure{}, path).ok());  // no panels: nothing is written
  EXPECT_FALSE(ReadFileToString(path).ok());
}

// Renders the figures aviary draws, for a look by eye: $TEST_TMPDIR or /tmp,
// aviary_plot_summary.png, aviary_plot_history.png and aviary_plot_job_history.png.
TEST(PlotTest, RendersExampleFigures) {
  const std::string dir = ::testing::TempDir();
  for (auto [name, figure] :
       {std::pair<const char*, Figure>{"aviary_plot_summary.png", SummaryFigure()},
        {"aviary_plot_history.png", HistoryFigure()},
        {"aviary_plot_job_history.png", JobHistoryFigure()}}) {
    absl::Status status = WritePng(figure, dir + "/" + name);
    ASSERT_TRUE(status.ok()) << status;
    Image image;
    ASSERT_TRUE(Decode(*ReadFileToString(dir + "/" + name), &image));
    EXPECT_GT(image.Count(PaletteColor(1)), 500) << name;
  }
}

// A 600x400 figure (text scale 1) with one panel of `lines` and no legend unless asked.
Figure LinesFigure(std::vector<Series> lines, bool legend = false) {
  Figure figure;
  figure.width = 600;
  figure.height = 400;
  Panel panel;
  panel.legend = legend;
  panel.lines = std::move(lines);
  figure.panels = {panel};
  return figure;
}

// The tests of text sizes below measure DejaVu Sans (fonts-dejavu-core, which
// scripts/lib/deps.sh installs). Without it fontconfig substitutes another font, or cairo its
// built-in one, and they fail on sizes: this says why.
TEST(PlotTest, FontPackageIsInstalled) {
  const char* font = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
  EXPECT_TRUE(ReadFileToString(font).ok())
      << font << " is missing: apt-get install fonts-dejavu-core";
}

TEST(PlotTest, TitleIsAntialiasedTextCentredAtTheTop) {
  Figure figure = LinesFigure({Series{"", {0, 1}, {0, 1}, 0x2266AA}});
  figure.title = "Training history of a long run";
  Image image = RenderOrDie(figure);
  ASSERT_EQ(image.width, 600);
  // The title's band: above the plot, which starts below it.
  const Bounds title = Find(image, 0, 0, image.width, 30, IsInk);
  ASSERT_FALSE(title.empty()) << "no title drawn";
  EXPECT_NEAR((title.x0 + title.x1) / 2.0, image.width / 2.0, 6) << "centred";
  EXPECT_GT(title.width(), 150) << "30 characters of a 15 px font";
  EXPECT_LT(title.width(), 450);
  EXPECT_GE(title.height(), 10) << "capitals and descenders";
  EXPECT_LE(title.height(), 24);
  // A real font rendered with antialiasing: many grey levels between the text colour and
  // white (a bitmap font scaled by whole pixels has none).
  std::set<uint32_t> greys;
  int solid = 0;
  for (int y = title.y0; y <= title.y1; ++y) {
    for (int x = title.x0; x <= title.x1; ++x) {
      uint32_t c = image.At(x, y);
      if (!IsInk(c)) continue;
      if (Channel(c, 0) <= 0x40) ++solid;
      if (Channel(c, 0) > 0x40) greys.insert(c);
    }
  }
  EXPECT_GT(greys.size(), 20u);
  EXPECT_GT(solid, 100) << "the stems are solid text colour";
  EXPECT_EQ(Find(image, 0, 0, image.width, 30, [](uint32_t c) { return c == 0x2266AAu; }).count, 0)
      << "the plot stays below the title";
}

TEST(PlotTest, TextScaleSetsTheFontSize) {
  auto title_height = [](int scale) {
    Figure figure = LinesFigure({Series{"", {0, 1}, {0, 1}}});
    figure.width = 1200;
    figure.height = 800;
    figure.title = "HHHH";  // capitals only: the height is the cap height
    figure.text_scale = scale;
    Image image = RenderOrDie(figure);
    // Figure titles are 1.35 times the 4 + 7 * scale px body font; DejaVu's capitals are
    // 0.73 em. The band above the plot: the padding (8 * scale) and the title's capitals.
    const double title_px = std::round(1.35 * (4 + 7 * scale));
    return Find(image, 0, 0, image.width, static_cast<int>(11 * scale + 0.8 * title_px), IsInk)
        .height();
  };
  EXPECT_NEAR(title_height(1), 0.73 * 15, 1.5);
  EXPECT_NEAR(title_height(3), 0.73 * 34, 1.5);
}

TEST(PlotTest, DrawsUtf8AndReplacesWhatIsNot) {
  auto render = [](const std::string& title) {
    Figure figure = LinesFigure({Series{"", {0, 1}, {0, 1}}});
    figure.title = title;
    absl::StatusOr<std::string> png = RenderPng(figure);
    EXPECT_TRUE(png.ok()) << png.status();
    return png.ok() ? *png : std::string();
  };
  EXPECT_NE(render("\xC2\xB5-law, na\xC3\xAFve"), render("?-law, na?ve")) << "µ and ï are drawn";
  // Bytes that are not UTF-8 (a lone continuation byte, a truncated sequence, an overlong
  // '/', a surrogate) become U+FFFD; control characters become spaces.
  const std::string replacement = "\xEF\xBF\xBD";
  EXPECT_EQ(render("a\x80z"), render("a" + replacement + "z"));
  EXPECT_EQ(render("a\xC3"), render("a" + replacement));
  EXPECT_EQ(render("\xC0\xAF"), render(replacement + replacement));
  EXPECT_EQ(render("\xED\xA0\x80"), render(replacement + replacement + replacement));
  EXPECT_EQ(render("a\tb\nc"), render("a b c"));
  EXPECT_NE(render("a\tb"), render("ab"));
}

TEST(PlotTest, YAxisLabelReadsBottomToTop) {
  Figure figure = LinesFigure({Series{"", {0, 1}, {0, 1}}});
  figure.panels[0].y_label = "a long label of the vertical axis";
  Image image = RenderOrDie(figure);
  // The label sits in the left padding, left of the tick labels: a tall, narrow column.
  const Bounds label = Find(image, 0, 0, 24, image.height, IsInk);
  ASSERT_FALSE(label.empty());
  EXPECT_GT(label.height(), 150) << "33 characters of an 11 px font";
  EXPECT_LE(label.width(), 14);
  EXPECT_NEAR((label.y0 + label.y1) / 2.0, image.height / 2.0, 30) << "centred on the plot";
}

TEST(PlotTest, LegendShowsEachNamedSeriesInItsColour) {
  // Rising lines leave the upper left corner free for the legend.
  std::vector<Series> lines = {Series{"first", {0, 1, 2}, {0, 1, 2}, 0xD62728},
                               Series{"second", {0, 1, 2}, {0, 0.8, 1.8}, 0x2CA02C, false, true},
                               Series{"", {0, 1, 2}, {0.2, 0.4, 0.6}, 0x9467BD}};
  Image with = RenderOrDie(LinesFigure(lines, true));
  Image without = RenderOrDie(LinesFigure(lines, false));
  // The legend's frame, 0xC8C8C8, and nothing of that colour without a legend.
  const Bounds frame =
      Find(with, 0, 0, with.width, with.height, [](uint32_t c) { return c == 0xC8C8C8u; });
  ASSERT_FALSE(frame.empty());
  EXPECT_EQ(without.Count(0xC8C8C8), 0);
  EXPECT_LT(frame.x1, with.width / 2) << "upper left, clear of the lines";
  EXPECT_LT(frame.y1, with.height / 2);
  // Inside it: a sample of each named series (dashed for the second), and their names.
  for (uint32_t color : {0xD62728u, 0x2CA02Cu}) {
    Bounds sample = Find(with, frame.x0, frame.y0, frame.x1, frame.y1,
                         [color](uint32_t c) { return c == color; });
    EXPECT_GE(sample.width(), 15) << std::hex << color;
    EXPECT_LE(sample.height(), 4) << std::hex << color << ": a horizontal sample";
  }
  EXPECT_EQ(
      Find(with, frame.x0, frame.y0, frame.x1, frame.y1, [](uint32_t c) { return c == 0x9467BDu; })
          .count,
      0)
      << "an unnamed series has no entry";
  const Bounds names = Find(with, frame.x0 + 1, frame.y0 + 1, frame.x1, frame.y1, IsInk);
  EXPECT_GT(names.count, 60) << "the names are written";
  EXPECT_GT(names.height(), 16) << "on two rows";
}

// An 800 x 400 figure of `left` and, right of it, a panel of one unnamed falling line (no legend).
Figure BesideALine(const Panel& left) {
  Figure figure;
  figure.width = 800;
  figure.height = 400;
  figure.columns = 2;
  Panel right;
  right.lines.push_back(Series{"", {0, 1, 2}, {2, 1, 0}, 0x2CA02C});
  figure.panels = {left, right};
  return figure;
}

// A long series name is shortened with "..." to its panel: its legend row is readable from its
// sample on and stays in the panel (a row wider than the panel was clamped with lo > hi: it
// started left of the figure, its sample and the name's start cut off).
TEST(PlotTest, ALongLegendNameStaysInItsPanel) {
  Panel left;
  left.legend = true;
  // A rising line (the legend inside the plot, if it fits) and a zigzag (no place inside: rows
  // under the plot).
  Series rising{std::string(400, 'x'), {0, 1, 2}, {0, 1, 2}, 0xD62728};
  Series zigzag{std::string(400, 'y'), {}, {}, 0xD62728};
  for (int i = 0; i < 200; ++i) {
    zigzag.x.push_back(i);
    zigzag.y.push_back(i % 2);
  }
  for (const Series& series : {rising, zigzag}) {
    left.lines = {series};
    Image image = RenderOrDie(BesideALine(left));
    const Bounds red = Find(image, image.width / 2, 0, image.width, image.height, [](uint32_t c) { return c == 0xD62728u; });
    EXPECT_TRUE(red.empty()) << series.name.substr(0, 1) << ": the left legend's sample is in the right panel";
    // The legend's row under the plot starts with the sample, at the panel's left edge (the row
    // started left of the figure: no sample, the name's start cut off).
    const Bounds sample = Find(image, 0, image.height * 9 / 10, image.width / 2, image.height,
                               [](uint32_t c) { return c == 0xD62728u; });
    EXPECT_GE(sample.width(), 15) << series.name.substr(0, 1) << ": no legend sample under the plot";
    EXPECT_LT(sample.x0, 40) << series.name.substr(0, 1);
  }
}

// A long category label is shortened with "..." to a third of its panel (centred under its bar,
// it ran into the next panel).
TEST(PlotTest, ALongCategoryLabelStaysInItsPanel) {
  Panel left;
  left.bars = BarSeries{"", {std::string(200, 'x'), "b"}, {1, 2}};
  Image image = RenderOrDie(BesideALine(left));
  // Left of the right panel's y axis, at the height of the x labels: nothing of the right panel.
  const Bounds ink = Find(image, image.width / 2, image.height * 9 / 10, image.width / 2 + 20, image.height, IsInk);
  EXPECT_TRUE(ink.empty()) << "the left panel's label runs into the right panel";
}

// Tick labels differ where their ticks do: 1e7 + k * 1000 and ticks 5e-8 apart printed three
// digits, the same on every tick; so did a log axis over a float's 0.001 and a double's.
TEST(PlotTest, TickLabelsHaveTheDigitsThatTellThemApart) {
  for (const auto& [lo, hi, log_scale] : std::vector<std::tuple<double, double, bool>>{
           {1e7, 1.005e7, false}, {0.6931471, 0.6931473, false}, {-2e9, -1.99999e9, false},
           {0.001, 0.0010000000474974513, true}}) {
    const std::vector<std::string> labels = AxisTickLabelsForTest(lo, hi, log_scale, 5);
    ASSERT_GE(labels.size(), 2u) << lo << " " << hi;
    EXPECT_EQ(std::set<std::string>(labels.begin(), labels.end()).size(), labels.size())
        << lo << " " << hi << ": " << ::testing::PrintToString(labels);
  }
  EXPECT_EQ(AxisTickLabelsForTest(0, 1, false, 5), (std::vector<std::string>{"0", "0.2", "0.4", "0.6", "0.8", "1.0"}));
  EXPECT_EQ(AxisTickLabelsForTest(1e7, 5e7, false, 4),
            (std::vector<std::string>{"1e+07", "2e+07", "3e+07", "4e+07", "5e+07"}));
}

// Values near the largest doubles: the lines and bars are drawn (the limits overflowed to
// infinities, and every point became NaN: an empty chart).
TEST(PlotTest, DrawsValuesNearTheLargestDoubles) {
  Figure figure;
  figure.width = 600;
  figure.height = 300;
  figure.columns = 2;
  Panel lines;
  lines.lines.push_back(Series{"", {0, 1, 2}, {-1.7e308, 0, 1.7e308}, 0x123456});
  Panel bars;
  bars.bars = BarSeries{"", {"a", "b"}, {1e308, 1.7e308}, 0x654321};
  figure.panels = {lines, bars};
  Image image = RenderOrDie(figure);
  EXPECT_GT(image.Count(0x123456), 50) << "the line is drawn";
  EXPECT_GT(image.Count(0x654321), 500) << "the bars are drawn";
}

TEST(PlotTest, DashedLinesHaveGapsAndSolidOnesNone) {
  Image image =
      RenderOrDie(LinesFigure({Series{"solid", {0, 10}, {1, 1}, 0xD62728},
                               Series{"dashed", {0, 10}, {2, 2}, 0x2CA02C, false, true}}));
  // Columns holding each colour, and their runs.
  auto columns = [&image](uint32_t color, int* runs) {
    int n = 0;
    bool in_run = false;
    *runs = 0;
    for (int x = 0; x < image.width; ++x) {
      bool hit = false;
      for (int y = 0; y < image.height && !hit; ++y) hit = image.At(x, y) == color;
      n += hit;
      *runs += hit && !in_run;
      in_run = hit;
    }
    return n;
  };
  int solid_runs = 0, dashed_runs = 0;
  const int solid = columns(0xD62728, &solid_runs), dashed = columns(0x2CA02C, &dashed_runs);
  EXPECT_GT(solid, image.width * 3 / 4) << "across the plot";
  EXPECT_EQ(solid_runs, 1);
  // Dashes of ~12 px with ~5 px gaps (at 2 px wide) over the same span.
  EXPECT_GE(dashed_runs, 20);
  EXPECT_GT(dashed, solid / 2);
  EXPECT_LT(dashed, solid * 9 / 10);
}

TEST(PlotTest, LinesAreAntialiased) {
  const uint32_t color = 0x1F77B4;
  Image image = RenderOrDie(LinesFigure({Series{"", {0, 1}, {0, 1}, color}}));
  // Edge pixels of the diagonal: the line colour blended into white, strictly between them.
  int solid = 0, blended = 0;
  for (int y = 0; y < image.height; ++y) {
    for (int x = 0; x < image.width; ++x) {
      const uint32_t c = image.At(x, y);
      solid += c == color;
      if (c == color || c == 0xFFFFFFu) continue;
      // On the segment from white to the colour: the same fraction in every channel.
      double t[3];
      for (int k = 0; k < 3; ++k) {
        t[k] = (255.0 - Channel(c, k)) / (255.0 - Channel(color, k));
      }
      if (t[0] > 0.05 && t[0] < 0.95 && std::abs(t[0] - t[1]) < 0.05 &&
          std::abs(t[0] - t[2]) < 0.05) {
        ++blended;
      }
    }
  }
  EXPECT_GT(solid, 300) << "a 2 px line across the plot";
  EXPECT_GT(blended, 300) << "with blended edges";
}

TEST(PlotTest, MarkerDrawsADotAndItsLabel) {
  Series series{"", {0, 1, 2, 3, 4}, {0.1, 0.5, 0.9, 0.5, 0.1}, 0x9467BD};
  Image plain = RenderOrDie(LinesFigure({series}));
  series.marker_index = 2;
  series.marker_label = "best 0.9";
  Image marked = RenderOrDie(LinesFigure({series}));
  // The dot (radius 4 px at text scale 1; the line is 2 px wide) is a solid 5x5 block of the
  // series colour at the peak, the top of the line.
  auto solid_block = [](const Image& image, uint32_t color) {
    for (int y = 0; y + 5 <= image.height; ++y) {
      for (int x = 0; x + 5 <= image.width; ++x) {
        bool all = true;
        for (int k = 0; k < 25 && all; ++k) all = image.At(x + k % 5, y + k / 5) == color;
        if (all) return Bounds{x, y, x + 4, y + 4, 25};
      }
    }
    return Bounds{};
  };
  EXPECT_TRUE(solid_block(plain, 0x9467BD).empty());
  const Bounds dot = solid_block(marked, 0x9467BD);
  ASSERT_FALSE(dot.empty());
  const Bounds line =
      Find(plain, 0, 0, plain.width, plain.height, [](uint32_t c) { return c == 0x9467BDu; });
  EXPECT_NEAR(dot.x0 + 2, (line.x0 + line.x1) / 2.0, 4) << "at the middle point";
  EXPECT_NEAR(dot.y0 + 2, line.y0, 5) << "at the top";
  EXPECT_GT(marked.Count(0x9467BD), plain.Count(0x9467BD) + 40) << "the dot and label frame";
  // The label's text sits beside the peak, in the upper half of the plot.
  const Bounds plain_ink = Find(plain, 60, 20, plain.width - 20, plain.height / 2, IsInk);
  const Bounds marked_ink = Find(marked, 60, 20, marked.width - 20, marked.height / 2, IsInk);
  EXPECT_GT(marked_ink.count, plain_ink.count + 40);
}

TEST(PlotTest, WritePngErrorsNameThePath) {
  absl::Status status = WritePng(SummaryFigure(), "/nonexistent-dir/x.png");
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find("/nonexistent-dir/x.png"), absl::string_view::npos) << status;
  const std::string path = ::testing::TempDir() + "/plot_test_empty.png";
  status = WritePng(Figure{}, path);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("WritePng " + path + ": figure has no panels"),
            absl::string_view::npos)
      << status;
}

}  // namespace
}  // namespace aviary::common
