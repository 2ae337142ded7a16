// PNG charts drawn with cairo: bar charts and line charts with one or two y axes.
//
// A Figure holds panels laid out on a grid; each panel draws optional bars (one bar per
// category, bar i centred at x = i) and any number of line series, with "nice" ticks
// (1/2/5 x 10^k, or decades on a log axis), grid lines, axis labels, a title and a legend.
// The layout, ticks and legend placement are our own; cairo draws them antialiased and writes
// the PNG (8-bit RGB). Text is UTF-8 in DejaVu Sans (Debian's fonts-dejavu-core, through
// cairo's toy font API and fontconfig, which substitutes another sans-serif font when it is
// missing); bytes that are not UTF-8 are drawn as U+FFFD, control characters as spaces.
//
// Used by `aviary dataset summary --plot` (sources bar chart + class long tail) and for a
// training run's history.png (AUC lines, loss on a second y axis, best epochs marked).
// Library aviary::plot (common/CMakeLists.txt), so that only its users link cairo.
//
// Everything here is a pure function of its arguments (and of the installed fonts) and is
// thread-safe.
#ifndef AVIARY_COMMON_PLOT_H_
#define AVIARY_COMMON_PLOT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace aviary::common {

// Colours are 0xRRGGBB. PaletteColor(i) is matplotlib's "tab10" cycle (blue, orange, green,
// red, purple, ...), repeating after ten.
uint32_t PaletteColor(int index);

// One line of (x, y) points. Points whose x or y is NaN or infinite (or y <= 0 on a log
// axis) are left out and break the line there; an isolated point is drawn as a dot.
struct Series {
  std::string name;          // legend text; an empty name keeps the series out of the legend
  std::vector<double> x, y;  // same length
  uint32_t rgb = 0x1F77B4;
  bool right_axis = false;  // plot against the panel's second (right) y axis
  bool dashed = false;
  // Highlights point `marker_index` (e.g. the best epoch) with a dot, a faint vertical guide
  // down to the x axis and a label; -1 for none.
  int marker_index = -1;
  std::string marker_label;  // the label; empty: the point's y value
};

// One bar per value; bar i is centred at x = i. Non-finite values (and values <= 0 on a log
// axis) draw no bar.
struct BarSeries {
  std::string name;  // legend text; empty keeps it out of the legend
  // Category labels under the bars, same length as `values`, thinned to every k-th label when
  // they do not fit. Empty: the x axis gets numeric ticks (the bar index) instead.
  std::vector<std::string> labels;
  std::vector<double> values;
  uint32_t rgb = 0x1F77B4;
  bool show_values = true;  // value above each bar, when every value label fits its bar
};

// One chart. Lines may be combined with bars (bar i at x = i).
struct Panel {
  std::string title, x_label, y_label;
  std::string y2_label;  // label of the right axis (shown when a series uses it)
  bool log_y = false;    // log10 scale for both y axes
  std::vector<Series> lines;
  std::optional<BarSeries> bars;
  // Legend of the named series and bars: inside the plot where it hides no data (corners
  // first), otherwise in rows under the x axis label.
  bool legend = true;
};

struct Figure {
  int width = 1200, height = 500;  // pixels, each in [200, 8000]
  std::string title;               // drawn centred above all panels
  std::vector<Panel> panels;       // at least one
  int columns = 0;                 // panels per row; 0: all in one row
  // Text scale, 0..16: the body font is 4 + 7 * text_scale px (11 px at 1, 18 px at 2), panel
  // titles a quarter larger; paddings, ticks and line widths grow with it too. 0: from the
  // size, round(min(width / 640, height / 320)) but at least 1, e.g. 2 for the default 1200x500.
  int text_scale = 0;
};

// Renders `figure` to PNG bytes. INVALID_ARGUMENT naming the panel and series for mismatched
// x/y or labels/values sizes, an out-of-range marker_index, a size outside [200, 8000], no
// panels, or panels too small to hold a chart; INTERNAL naming the cairo call that failed.
absl::StatusOr<std::string> RenderPng(const Figure& figure);

// Renders `figure` and writes it to `path` atomically (temporary file + rename): a user's output
// (`--plot F`), so a symbolic link there is written through (WriteOutputFileAtomically); errors
// start with "WritePng <path>: ".
absl::Status WritePng(const Figure& figure, const std::string& path);

// Encodes `rgb` (height rows of width pixels, 3 bytes each, top row first) as an 8-bit RGB
// PNG with cairo's writer.
absl::StatusOr<std::string> EncodePng(int width, int height, absl::string_view rgb);

// For tests: the tick labels of an axis over [lo, hi] (data units; > 0 for a log axis), about
// `target` of them, as a panel's axis gets them.
std::vector<std::string> AxisTickLabelsForTest(double lo, double hi, bool log_scale, int target);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_PLOT_H_
