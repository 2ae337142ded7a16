#include "common/plot.h"

#include <cairo.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/status.h"
#include "common/utf8.h"

namespace aviary::common {
namespace {

constexpr int kMinSidePx = 200;
constexpr int kMaxSidePx = 8000;

constexpr uint32_t kTextColor = 0x262626;
constexpr uint32_t kAxisColor = 0x404040;
constexpr uint32_t kGridColor = 0xE5E5E5;
constexpr uint32_t kLegendEdgeColor = 0xC8C8C8;
constexpr uint32_t kWhite = 0xFFFFFF;
constexpr double kPi = 3.14159265358979323846;

// The family asked of fontconfig (fonts-dejavu-core); it substitutes another sans-serif font
// when DejaVu Sans is not installed.
constexpr char kFontFamily[] = "DejaVu Sans";
// The body font's em size at text scale s is kFontBasePx + kFontPxPerScale * s pixels (11 px
// at 1, 18 px at 2: capitals 8 and 13 px high); titles are a quarter larger.
constexpr double kFontBasePx = 4;
constexpr double kFontPxPerScale = 7;
constexpr double kLineWidthPerScale = 2;

absl::Status CairoError(absl::string_view call, cairo_status_t status) {
  return absl::InternalError(
      absl::StrCat("cairo ", call, " failed: ", cairo_status_to_string(status)));
}

struct SurfaceDeleter {
  void operator()(cairo_surface_t* surface) const { cairo_surface_destroy(surface); }
};
struct ContextDeleter {
  void operator()(cairo_t* cr) const { cairo_destroy(cr); }
};
struct FontFaceDeleter {
  void operator()(cairo_font_face_t* face) const { cairo_font_face_destroy(face); }
};
using SurfacePtr = std::unique_ptr<cairo_surface_t, SurfaceDeleter>;
using ContextPtr = std::unique_ptr<cairo_t, ContextDeleter>;
using FontFacePtr = std::unique_ptr<cairo_font_face_t, FontFaceDeleter>;

// An RGB24 image surface of width x height pixels, or the error naming the size.
absl::StatusOr<SurfacePtr> CreateSurface(int width, int height) {
  SurfacePtr surface(cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height));
  if (cairo_status_t st = cairo_surface_status(surface.get()); st != CAIRO_STATUS_SUCCESS) {
    return CairoError(absl::StrCat("image_surface_create(", width, "x", height, ")"), st);
  }
  return surface;
}

// The surface as PNG bytes (cairo's writer: 8-bit RGB for an RGB24 surface).
absl::StatusOr<std::string> SurfaceToPng(cairo_surface_t* surface) {
  cairo_surface_flush(surface);
  std::string png;
  cairo_status_t st = cairo_surface_write_to_png_stream(
      surface,
      [](void* closure, const unsigned char* data, unsigned int length) {
        static_cast<std::string*>(closure)->append(reinterpret_cast<const char*>(data), length);
        return CAIRO_STATUS_SUCCESS;
      },
      &png);
  if (st != CAIRO_STATUS_SUCCESS) return CairoError("surface_write_to_png_stream", st);
  return png;
}

// `text` as valid UTF-8 for cairo (which refuses anything else): each byte that does not start
// a well-formed sequence becomes U+FFFD, control characters become spaces.
std::string DisplayText(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    const size_t len = Utf8SequenceLength(text, i);
    if (len == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD
      ++i;
    } else if (c < 0x20 || c == 0x7F || (c == 0xC2 && static_cast<unsigned char>(text[i + 1]) < 0xA0)) {
      out.push_back(' ');  // C0 and C1 controls (U+0080..U+009F) are not drawable
      i += len;
    } else {
      out.append(text.data() + i, len);
      i += len;
    }
  }
  return out;
}

// Drops the last code point of valid UTF-8 `text`.
void PopCodePoint(std::string* text) {
  while (!text->empty() && (static_cast<unsigned char>(text->back()) & 0xC0) == 0x80) {
    text->pop_back();
  }
  if (!text->empty()) text->pop_back();
}

struct Point {
  double x, y;
};

struct Box {
  double x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  double width() const { return x1 - x0; }
  double height() const { return y1 - y0; }
  bool Contains(Point p) const { return p.x >= x0 && p.x < x1 && p.y >= y0 && p.y < y1; }
};

struct Font {
  double size_px = 12;  // the em size
  bool bold = false;
};

struct TextStyle {
  Font font;
  uint32_t color = kTextColor;
};

enum class Align { kStart, kCenter, kEnd };

double AlignOffset(Align align, double size) {
  switch (align) {
    case Align::kStart:
      return 0;
    case Align::kCenter:
      return size / 2;
    case Align::kEnd:
      return size;
  }
  return 0;
}

// A white RGB canvas drawn with cairo: antialiased shapes and text in DejaVu Sans.
// Continuous coordinates: pixel (i, j) covers [i, i+1) x [j, j+1), y down, so shapes with
// whole-pixel edges are crisp. cairo errors are sticky: a failed call makes every later call a
// no-op, and Encode() reports the first error.
class Canvas {
 public:
  static absl::StatusOr<std::unique_ptr<Canvas>> Create(int width, int height) {
    AVIARY_ASSIGN_OR_RETURN(SurfacePtr surface, CreateSurface(width, height));
    ContextPtr cr(cairo_create(surface.get()));
    if (cairo_status_t st = cairo_status(cr.get()); st != CAIRO_STATUS_SUCCESS) {
      return CairoError("create", st);
    }
    auto canvas = std::unique_ptr<Canvas>(new Canvas(std::move(surface), std::move(cr)));
    for (cairo_font_weight_t weight : {CAIRO_FONT_WEIGHT_NORMAL, CAIRO_FONT_WEIGHT_BOLD}) {
      FontFacePtr face(cairo_toy_font_face_create(kFontFamily, CAIRO_FONT_SLANT_NORMAL, weight));
      if (cairo_status_t st = cairo_font_face_status(face.get()); st != CAIRO_STATUS_SUCCESS) {
        return CairoError(absl::StrCat("toy_font_face_create('", kFontFamily, "')"), st);
      }
      (weight == CAIRO_FONT_WEIGHT_BOLD ? canvas->bold_ : canvas->regular_) = std::move(face);
    }
    cairo_t* c = canvas->cr_.get();
    // Grey antialiasing (no colour fringes), slight hinting for crisp stems at small sizes.
    cairo_font_options_t* options = cairo_font_options_create();
    cairo_font_options_set_antialias(options, CAIRO_ANTIALIAS_GRAY);
    cairo_font_options_set_hint_style(options, CAIRO_HINT_STYLE_SLIGHT);
    cairo_font_options_set_hint_metrics(options, CAIRO_HINT_METRICS_ON);
    cairo_set_font_options(c, options);
    cairo_font_options_destroy(options);
    cairo_set_source_rgb(c, 1, 1, 1);
    cairo_paint(c);
    AVIARY_RETURN_IF_ERROR(canvas->Status());
    return canvas;
  }

  // The first cairo error of the drawing so far.
  absl::Status Status() const {
    if (cairo_status_t st = cairo_status(cr_.get()); st != CAIRO_STATUS_SUCCESS) {
      return CairoError("drawing", st);
    }
    if (cairo_status_t st = cairo_surface_status(surface_.get()); st != CAIRO_STATUS_SUCCESS) {
      return CairoError("surface", st);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> Encode() {
    AVIARY_RETURN_IF_ERROR(Status());
    return SurfaceToPng(surface_.get());
  }

  // Fills [x0, x1) x [y0, y1) with `color` at opacity `alpha` (fractional edges antialiased).
  void FillRect(double x0, double y0, double x1, double y1, uint32_t color, double alpha = 1.0) {
    cairo_t* c = cr_.get();
    SetColor(color, alpha);
    cairo_rectangle(c, std::min(x0, x1), std::min(y0, y1), std::abs(x1 - x0), std::abs(y1 - y0));
    cairo_fill(c);
  }

  // A one-pixel outline just inside `b` (whole-pixel edges).
  void StrokeBox(const Box& b, uint32_t color) {
    cairo_t* c = cr_.get();
    SetColor(color, 1.0);
    cairo_set_line_width(c, 1.0);
    cairo_set_dash(c, nullptr, 0, 0);
    cairo_rectangle(c, b.x0 + 0.5, b.y0 + 0.5, b.width() - 1, b.height() - 1);
    cairo_stroke(c);
  }

  void FillDisc(double cx, double cy, double radius, uint32_t color) {
    cairo_t* c = cr_.get();
    SetColor(color, 1.0);
    cairo_new_path(c);
    cairo_arc(c, cx, cy, radius, 0, 2 * kPi);
    cairo_fill(c);
  }

  // Connected runs of points, clipped to `clip`, with round joins and caps; a run of one point
  // is a dot of radius `width`. Dashes restart at each run.
  void DrawPolyline(const Box& clip, const std::vector<std::vector<Point>>& runs, double width,
                    uint32_t color, bool dashed) {
    cairo_t* c = cr_.get();
    cairo_save(c);
    cairo_rectangle(c, clip.x0, clip.y0, clip.width(), clip.height());
    cairo_clip(c);
    SetColor(color, 1.0);
    cairo_set_line_width(c, width);
    cairo_set_line_cap(c, CAIRO_LINE_CAP_ROUND);
    cairo_set_line_join(c, CAIRO_LINE_JOIN_ROUND);
    // Round caps widen every dash by `width`: the visible pattern is ~6w on, ~2.5w off.
    const double dashes[2] = {5 * width, 3.5 * width};
    cairo_set_dash(c, dashed ? dashes : nullptr, dashed ? 2 : 0, 0);
    cairo_new_path(c);
    for (const auto& run : runs) {
      if (run.size() < 2) continue;
      cairo_move_to(c, run[0].x, run[0].y);
      for (size_t i = 1; i < run.size(); ++i) cairo_line_to(c, run[i].x, run[i].y);
    }
    cairo_stroke(c);
    for (const auto& run : runs) {
      if (run.size() != 1) continue;
      cairo_new_sub_path(c);
      cairo_arc(c, run[0].x, run[0].y, width, 0, 2 * kPi);
    }
    cairo_fill(c);
    cairo_restore(c);
  }

  // Text metrics in pixels: the advance width of `text`, the height of capitals above the
  // baseline, and that plus the descent (the room a line of text takes).
  double TextWidth(absl::string_view text, const Font& font) {
    if (text.empty()) return 0;
    SetFont(font);
    cairo_text_extents_t extents;
    cairo_text_extents(cr_.get(), DisplayText(text).c_str(), &extents);
    return extents.x_advance;
  }
  double CapHeight(const Font& font) {
    SetFont(font);
    cairo_text_extents_t extents;
    cairo_text_extents(cr_.get(), "H", &extents);
    return -extents.y_bearing;
  }
  double TextHeight(const Font& font) {
    SetFont(font);
    cairo_font_extents_t extents;
    cairo_font_extents(cr_.get(), &extents);
    return CapHeight(font) + extents.descent;
  }

  // `text` cut to fit `max_width` pixels, ending in an ellipsis when cut.
  std::string FitText(absl::string_view text, double max_width, const Font& font) {
    std::string cut = DisplayText(text);
    if (TextWidth(cut, font) <= max_width) return cut;
    while (!cut.empty() && TextWidth(cut + "\u2026", font) > max_width) PopCodePoint(&cut);
    return cut + "\u2026";
  }

  // Horizontal text. (x, y) is the anchor: `h` aligns the text's width to it, `v` its cap
  // height (descenders hang below). The baseline and left edge are rounded to whole pixels.
  void DrawText(absl::string_view text, double x, double y, const TextStyle& style, Align h,
                Align v) {
    if (text.empty()) return;
    const std::string shown = DisplayText(text);
    const double left = std::round(x - AlignOffset(h, TextWidth(shown, style.font)));
    const double cap = CapHeight(style.font);
    const double baseline = std::round(y - AlignOffset(v, cap) + cap);
    cairo_t* c = cr_.get();
    SetFont(style.font);
    SetColor(style.color, 1.0);
    cairo_move_to(c, left, baseline);
    cairo_show_text(c, shown.c_str());
    cairo_new_path(c);
  }

  // Text rotated 90 degrees counter-clockwise (reading bottom to top), centred on (cx, cy).
  void DrawTextVertical(absl::string_view text, double cx, double cy, const TextStyle& style) {
    if (text.empty()) return;
    const std::string shown = DisplayText(text);
    const double length = TextWidth(shown, style.font);
    const double cap = CapHeight(style.font);
    cairo_t* c = cr_.get();
    cairo_save(c);
    // Rotated, the text's x runs up the image and its y to the right: the baseline is the
    // column right of the capitals.
    cairo_translate(c, std::round(cx + cap / 2), std::round(cy + length / 2));
    cairo_rotate(c, -kPi / 2);
    SetFont(style.font);
    SetColor(style.color, 1.0);
    cairo_move_to(c, 0, 0);
    cairo_show_text(c, shown.c_str());
    cairo_new_path(c);
    cairo_restore(c);
  }

 private:
  Canvas(SurfacePtr surface, ContextPtr cr) : surface_(std::move(surface)), cr_(std::move(cr)) {}

  void SetColor(uint32_t color, double alpha) {
    cairo_set_source_rgba(cr_.get(), ((color >> 16) & 0xFF) / 255.0, ((color >> 8) & 0xFF) / 255.0,
                          (color & 0xFF) / 255.0, std::clamp(alpha, 0.0, 1.0));
  }

  void SetFont(const Font& font) {
    cairo_set_font_face(cr_.get(), font.bold ? bold_.get() : regular_.get());
    cairo_set_font_size(cr_.get(), font.size_px);
  }

  SurfacePtr surface_;
  ContextPtr cr_;
  FontFacePtr regular_, bold_;
};

// ---------------------------------------------------------------------------------------------
// Numbers and axes.

bool Finite(double v) { return std::isfinite(v); }

std::string FormatFixed(double v, int decimals) {
  std::string out = absl::StrFormat("%.*f", decimals, v);
  if (out.find_first_not_of("-0.") == std::string::npos) {  // no "-0" or "-0.00"
    return decimals > 0 ? out.substr(out[0] == '-') : "0";
  }
  return out;
}

// A tick label for `v` on a linear axis whose ticks are `step` apart.
std::string FormatTick(double v, double step) {
  if (std::abs(v) < step * 1e-6) return "0";
  if (std::abs(v) >= 1e7 || step < 1e-6) {
    // As many significant digits as reach the step's: ticks 1e7 + k * 1000 read 1.001e+07, ...
    // and 0.69314715, 0.6931472, ... (three digits printed every tick the same).
    const int digits = static_cast<int>(std::floor(std::log10(std::abs(v)))) -
                       static_cast<int>(std::floor(std::log10(step))) + 1;
    return absl::StrFormat("%.*g", std::clamp(digits, 3, 17), v);
  }
  int decimals = std::max(0, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
  return FormatFixed(v, decimals);
}

// A label for a data value (bar values, markers): integers in full, otherwise 3-4 digits.
std::string FormatValue(double v) {
  if (!Finite(v)) return absl::StrCat(v);
  if (v == 0) return "0";
  if (v == std::round(v) && std::abs(v) < 1e12) return absl::StrFormat("%.0f", v);
  if (std::abs(v) < 1 && std::abs(v) >= 1e-3) return absl::StrFormat("%.3f", v);
  return absl::StrFormat("%.4g", v);
}

// 1, 2 or 5 times a power of ten, >= raw.
double NiceStep(double raw) {
  if (!(raw > 0) || !Finite(raw)) return 1;
  double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double norm = raw / mag;
  double nice = norm <= 1 + 1e-9 ? 1 : norm <= 2 + 1e-9 ? 2 : norm <= 5 + 1e-9 ? 5 : 10;
  return nice * mag;
}

// One axis. Log axes keep lo/hi and ticks in log10 units; Transform maps data there.
struct Axis {
  bool log = false;
  double lo = 0, hi = 1;
  std::vector<double> ticks;  // transformed units
  std::vector<std::string> labels;
  std::vector<double> minor_ticks;  // unlabelled (log axes: 2..9 x 10^k)

  // NaN when the value cannot be shown.
  double Transform(double v) const {
    if (!Finite(v)) return std::numeric_limits<double>::quiet_NaN();
    if (!log) return v;
    return v > 0 ? std::log10(v) : std::numeric_limits<double>::quiet_NaN();
  }
  // Position of a transformed value: 0 at lo, 1 at hi. In halves (exact), so that limits near
  // the largest doubles do not overflow to an infinite span.
  double Unit(double t) const { return (t * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5); }
};

void MakeLinearTicks(Axis* axis, int target, double min_step) {
  axis->ticks.clear();
  axis->labels.clear();
  axis->minor_ticks.clear();
  double step = std::max(NiceStep((axis->hi * 0.5 - axis->lo * 0.5) / std::max(1, target) * 2), min_step);
  const double first = std::ceil(axis->lo / step - 1e-9);
  const double last = std::floor(axis->hi / step + 1e-9);
  // Absurd ranges (overflowing spans, or ticks beyond 2^53) get no ticks rather than UB.
  if (!Finite(first) || !Finite(last) || std::abs(first) > 1e15 || std::abs(last) > 1e15) return;
  const long long k0 = static_cast<long long>(first), k1 = static_cast<long long>(last);
  for (long long k = k0; k <= k1 && axis->ticks.size() < 100; ++k) {
    double v = static_cast<double>(k) * step;
    axis->ticks.push_back(v);
    axis->labels.push_back(FormatTick(v, step));
  }
}

// "m x 10^k" as plain digits where short, else "me<k>".
std::string FormatLogTick(int mantissa, int exponent) {
  if (exponent >= 0 && exponent <= 6)
    return absl::StrFormat("%.0f", mantissa * std::pow(10.0, exponent));
  if (exponent < 0 && exponent >= -4)
    return FormatFixed(mantissa * std::pow(10.0, exponent), -exponent);
  return absl::StrCat(mantissa, "e", exponent);
}

void MakeLogTicks(Axis* axis, int target) {
  axis->ticks.clear();
  axis->labels.clear();
  axis->minor_ticks.clear();
  const int k0 = static_cast<int>(std::ceil(axis->lo - 1e-9));
  const int k1 = static_cast<int>(std::floor(axis->hi + 1e-9));
  if (k1 - k0 + 1 >= 2) {  // at least two decades: label decades, thinned to `target`
    int every = std::max(1, (k1 - k0 + 1 + target - 1) / std::max(1, target));
    for (int k = k0; k <= k1; ++k) {
      if ((k - k0) % every != 0) continue;
      axis->ticks.push_back(k);
      axis->labels.push_back(FormatLogTick(1, k));
    }
    if (every == 1 && k1 - k0 <= 8) {
      for (int k = k0 - 1; k <= k1; ++k) {
        for (int m = 2; m <= 9; ++m) {
          double t = k + std::log10(static_cast<double>(m));
          if (t >= axis->lo && t <= axis->hi) axis->minor_ticks.push_back(t);
        }
      }
    }
    return;
  }
  for (const std::vector<int>& mantissas :
       {std::vector<int>{1, 2, 5}, std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8, 9}}) {
    axis->ticks.clear();
    axis->labels.clear();
    for (int k = static_cast<int>(std::floor(axis->lo)); k <= static_cast<int>(std::ceil(axis->hi));
         ++k) {
      for (int m : mantissas) {
        double t = k + std::log10(static_cast<double>(m));
        if (t < axis->lo - 1e-9 || t > axis->hi + 1e-9) continue;
        axis->ticks.push_back(t);
        axis->labels.push_back(FormatLogTick(m, k));
      }
    }
    if (axis->ticks.size() >= 2) return;
  }
  // Narrower than one step of 1..9: plain nice ticks in data units.
  double vlo = std::pow(10.0, axis->lo), vhi = std::pow(10.0, axis->hi);
  Axis linear;
  linear.lo = vlo;
  linear.hi = vhi;
  MakeLinearTicks(&linear, target, 0);
  axis->ticks.clear();
  axis->labels = linear.labels;
  for (double v : linear.ticks) axis->ticks.push_back(std::log10(v));
}

// Min/max of finite transformed values.
struct Extent {
  double lo = std::numeric_limits<double>::infinity();
  double hi = -std::numeric_limits<double>::infinity();
  void Add(double v) {
    if (!Finite(v)) return;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  bool empty() const { return lo > hi; }
};

// `v` within the finite doubles (a limit past them drew nothing: every point at an infinite one).
double Finitely(double v) {
  return std::clamp(v, -std::numeric_limits<double>::max(), std::numeric_limits<double>::max());
}

// Axis limits from the data extent: `margin` of the span on each side, degenerate spans padded.
void SetLimits(Axis* axis, Extent e, double margin) {
  if (e.empty()) {
    axis->lo = 0;
    axis->hi = 1;
    return;
  }
  if (e.hi * 0.5 - e.lo * 0.5 <= std::abs(e.hi) * 0.5e-12) {
    double pad = axis->log ? 0.5 : (e.lo != 0 ? std::abs(e.lo) * 0.1 : 1.0);
    axis->lo = Finitely(e.lo - pad);
    axis->hi = Finitely(e.hi + pad);
    return;
  }
  const double half_span = e.hi * 0.5 - e.lo * 0.5;
  axis->lo = Finitely(e.lo - 2 * margin * half_span);
  axis->hi = Finitely(e.hi + 2 * margin * half_span);
}

// ---------------------------------------------------------------------------------------------
// Panels.

std::string PanelName(const Panel& panel, size_t index) {
  return absl::StrCat("panel ", index,
                      panel.title.empty() ? "" : absl::StrCat(" ('", panel.title, "')"));
}

absl::Status CheckColor(uint32_t rgb, const std::string& what) {
  if (rgb > 0xFFFFFF) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: rgb 0x%X is not 0xRRGGBB", what, rgb));
  }
  return absl::OkStatus();
}

absl::Status ValidatePanel(const Panel& panel, size_t index) {
  const std::string where = PanelName(panel, index);
  for (const Series& s : panel.lines) {
    const std::string series = absl::StrCat(where, ": series '", s.name, "'");
    if (s.x.size() != s.y.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(series, " has ", s.x.size(), " x values but ", s.y.size(), " y values"));
    }
    if (s.marker_index < -1 || s.marker_index >= static_cast<int>(s.x.size())) {
      return absl::InvalidArgumentError(absl::StrCat(series, ": marker_index ", s.marker_index,
                                                     " is out of range for ", s.x.size(),
                                                     " points"));
    }
    AVIARY_RETURN_IF_ERROR(CheckColor(s.rgb, series));
  }
  if (panel.bars) {
    const std::string bars = absl::StrCat(where, ": bars '", panel.bars->name, "'");
    if (!panel.bars->labels.empty() && panel.bars->labels.size() != panel.bars->values.size()) {
      return absl::InvalidArgumentError(absl::StrCat(bars, " have ", panel.bars->labels.size(),
                                                     " labels but ", panel.bars->values.size(),
                                                     " values"));
    }
    AVIARY_RETURN_IF_ERROR(CheckColor(panel.bars->rgb, bars));
  }
  return absl::OkStatus();
}

// Sizes shared by every panel of a figure, derived from the text scale.
struct Metrics {
  int s;             // text scale: the unit of paddings, ticks and line widths
  Font font;         // tick labels, axis labels, legends, value labels
  Font title_font;   // panel titles
  Font figure_font;  // the figure's title
  int pad;           // outer padding
  int gap;           // between a tick and its label, a label and its axis label
  int tick_len;
  double line_width;
};

Metrics MakeMetrics(int scale) {
  Metrics m;
  m.s = scale;
  m.font = Font{kFontBasePx + kFontPxPerScale * scale};
  m.title_font = Font{std::round(1.25 * m.font.size_px)};
  m.figure_font = Font{std::round(1.35 * m.font.size_px), true};
  m.pad = 8 * scale;
  m.gap = 4 * scale;
  m.tick_len = 4 * scale;
  m.line_width = kLineWidthPerScale * scale;
  return m;
}

// Lays out and draws one panel into its area of the canvas.
class PanelRenderer {
 public:
  PanelRenderer(Canvas* canvas, const Panel& panel, const Metrics& m)
      : canvas_(canvas), panel_(panel), m_(m) {}

  absl::Status Render(const Box& area) {
    area_ = area;
    AVIARY_RETURN_IF_ERROR(Layout(0));
    BuildGeometry();
    has_legend_ = panel_.legend && !LegendEntries().empty();
    if (has_legend_) {
      // Inside the plot where it hides nothing; otherwise in rows under the x axis label.
      size_t covered = 0;
      legend_box_ = LegendBox(&covered);
      if (covered > 0) {
        std::vector<std::vector<size_t>> rows = LegendRowsBelow();
        if (Layout(rows.size()).ok()) {
          legend_rows_ = std::move(rows);
        } else {  // no room below: keep it inside after all
          AVIARY_RETURN_IF_ERROR(Layout(0));
        }
        BuildGeometry();
      }
    }
    PlaceMarkerLabels();  // they make way for the legend
    DrawGrid();
    DrawBars();
    for (size_t i = 0; i < panel_.lines.size(); ++i) {
      const Series& s = panel_.lines[i];
      canvas_->DrawPolyline(plot_, runs_[i], m_.line_width, s.rgb, s.dashed);
    }
    DrawFrameAndTicks();
    DrawMarkers();
    DrawLabels();
    DrawLegend();
    return absl::OkStatus();
  }

 private:
  bool HasBars() const { return panel_.bars.has_value() && !panel_.bars->values.empty(); }
  // Right-axis series use the right axis only when something else uses the left one.
  bool OnRight(const Series& s) const { return s.right_axis && right_used_; }
  const Axis& YAxis(const Series& s) const { return OnRight(s) ? y2_ : y_; }

  double XPx(double t) const { return plot_.x0 + x_.Unit(t) * plot_.width(); }
  double YPx(const Axis& axis, double t) const { return plot_.y1 - axis.Unit(t) * plot_.height(); }
  // Text metrics of the body font.
  double TextWidth(absl::string_view text) const { return canvas_->TextWidth(text, m_.font); }
  double TextHeight() const { return canvas_->TextHeight(m_.font); }
  double CapHeight() const { return canvas_->CapHeight(m_.font); }
  double CharWidth() const { return canvas_->TextWidth("0", m_.font); }
  int AxisWidth() const { return std::max(1, m_.s); }

  double MaxLabelWidth(const std::vector<std::string>& labels) const {
    double w = 0;
    for (const std::string& l : labels) w = std::max(w, TextWidth(l));
    return w;
  }

  // Places the plot area, axes limits and ticks, leaving `legend_rows` rows of legend entries
  // under the x axis label.
  absl::Status Layout(size_t legend_rows) {
    const double ch = TextHeight();
    bool has_left = HasBars();
    bool has_right = false;
    for (const Series& series : panel_.lines) (series.right_axis ? has_right : has_left) = true;
    right_used_ = has_left && has_right;

    // Vertical margins first: they fix the plot height, which sets the number of y ticks.
    double top = area_.y0 + m_.pad;
    if (!panel_.title.empty()) top += canvas_->CapHeight(m_.title_font) + m_.pad;
    double bottom = area_.y1 - m_.pad - AxisWidth() - m_.tick_len - m_.gap - ch;
    if (!panel_.x_label.empty()) bottom -= m_.gap + ch;
    if (legend_rows > 0) bottom -= 2 * m_.gap + legend_rows * LegendRow();
    plot_.y0 = std::round(top);
    plot_.y1 = std::round(bottom);
    if (plot_.height() < 40) {
      return absl::InvalidArgumentError(absl::StrCat("the plot area is only ", plot_.height(),
                                                     " px high; make the figure taller"));
    }

    // Y limits.
    y_.log = y2_.log = panel_.log_y;
    Extent left, right;
    for (const Series& series : panel_.lines) {
      const bool on_right = OnRight(series);
      for (size_t i = 0; i < series.y.size(); ++i) {
        if (!Finite(series.x[i])) continue;
        (on_right ? right : left).Add((on_right ? y2_ : y_).Transform(series.y[i]));
      }
    }
    Extent bar_extent;
    if (HasBars()) {
      for (double v : panel_.bars->values) bar_extent.Add(y_.Transform(v));
      if (!bar_extent.empty() && !y_.log) bar_extent.Add(0);
    }
    if (!bar_extent.empty()) {
      Extent e = bar_extent;
      if (!left.empty()) {
        e.Add(left.lo);
        e.Add(left.hi);
      }
      double span = Finitely(e.hi - e.lo);
      if (y_.log) {
        // Start below the smallest bar so that it still shows.
        if (span <= 0) span = 1;
        y_.lo = e.lo - 0.15 * span;
        y_.hi = e.hi + 0.05 * span;
      } else if (span <= 0) {
        y_.lo = 0;
        y_.hi = 1;
      } else {
        y_.lo = e.lo < 0 ? Finitely(e.lo - 0.05 * span) : e.lo;
        y_.hi = e.hi > 0 ? Finitely(e.hi + 0.05 * span) : e.hi;
      }
      // Room for value labels above the bars.
      show_bar_values_ = false;
      if (panel_.bars->show_values) {
        std::vector<std::string> texts;
        for (double v : panel_.bars->values) texts.push_back(FormatValue(v));
        double estimated_unit = area_.width() * 0.85 / panel_.bars->values.size();
        show_bar_values_ = MaxLabelWidth(texts) <= estimated_unit - 2;
      }
      if (show_bar_values_) {
        // Labels go above positive bars and below negative ones.
        const double fraction = std::min(0.3, (ch + 2.0 * m_.gap) / plot_.height());
        const double extra = Finitely((y_.hi * 0.5 - y_.lo * 0.5) * 2 * fraction / (1 - 2 * fraction));
        if (!y_.log && e.lo < 0) y_.lo = Finitely(y_.lo - extra);
        if (y_.log || e.hi > 0) y_.hi = Finitely(y_.hi + extra);
      }
    } else {
      SetLimits(&y_, left, 0.05);
    }
    SetLimits(&y2_, right, 0.05);
    const int y_target = std::clamp(static_cast<int>(plot_.height() / (ch * 2.5)), 2, 10);
    for (Axis* axis : {&y_, &y2_}) {
      if (axis->log) {
        MakeLogTicks(axis, y_target);
      } else {
        MakeLinearTicks(axis, y_target, 0);
      }
    }

    // Horizontal margins from the widest tick labels.
    double left_margin = m_.pad + MaxLabelWidth(y_.labels) + m_.gap + m_.tick_len + AxisWidth();
    if (!LeftLabel().empty()) left_margin += TextHeight() + m_.gap;
    double right_margin = m_.pad + 2 * CharWidth();
    if (right_used_) {
      right_margin = m_.pad + AxisWidth() + m_.tick_len + m_.gap + MaxLabelWidth(y2_.labels);
      if (!panel_.y2_label.empty()) right_margin += TextHeight() + m_.gap;
    }
    plot_.x0 = std::round(area_.x0 + left_margin);
    plot_.x1 = std::round(area_.x1 - right_margin);
    if (plot_.width() < 40) {
      return absl::InvalidArgumentError(
          absl::StrCat("the plot area is only ", plot_.width(), " px wide; make the figure wider"));
    }

    // X limits and ticks.
    Extent ex;
    bool integer_x = true;
    for (const Series& series : panel_.lines) {
      for (size_t i = 0; i < series.x.size(); ++i) {
        if (!Finite(series.x[i]) || !Finite(YAxis(series).Transform(series.y[i]))) continue;
        ex.Add(series.x[i]);
        integer_x = integer_x && series.x[i] == std::round(series.x[i]);
      }
    }
    if (HasBars()) {
      const double n = static_cast<double>(panel_.bars->values.size());
      x_.lo = std::min(-0.5, ex.empty() ? -0.5 : ex.lo);
      x_.hi = std::max(n - 0.5, ex.empty() ? n - 0.5 : ex.hi);
    } else {
      SetLimits(&x_, ex, 0.05);
    }
    categorical_ = HasBars() && !panel_.bars->labels.empty();
    if (categorical_) {
      // Every k-th category label, k in 1, 2, 5, 10, 20, ... so that labels do not touch.
      // A label wider than a third of the panel is shortened with "..." (it ran into the next panel).
      std::vector<std::string> labels;
      for (const std::string& label : panel_.bars->labels) {
        labels.push_back(canvas_->FitText(label, area_.width() / 3.0, m_.font));
      }
      double unit = plot_.width() / (x_.hi - x_.lo);
      double needed = MaxLabelWidth(labels) + 2.0 * CharWidth();
      long long every = static_cast<long long>(NiceStep(needed / unit));
      if (needed <= unit) every = 1;
      x_.ticks.clear();
      x_.labels.clear();
      for (size_t i = 0; i < labels.size(); i += static_cast<size_t>(every)) {
        x_.ticks.push_back(static_cast<double>(i));
        x_.labels.push_back(labels[i]);
      }
    } else {
      int target = std::clamp(static_cast<int>(plot_.width() / (8 * CharWidth())), 2, 12);
      for (; target >= 2; --target) {
        MakeLinearTicks(&x_, target, integer_x || HasBars() ? 1.0 : 0.0);
        double needed = x_.ticks.size() * (MaxLabelWidth(x_.labels) + 2.0 * CharWidth());
        if (needed <= plot_.width()) break;
      }
    }
    return absl::OkStatus();
  }

  const std::string& LeftLabel() const {
    // With only right-axis series the left axis shows them, under the right label.
    if (panel_.y_label.empty() && !right_used_ && !panel_.lines.empty() && !HasBars()) {
      return panel_.y2_label;
    }
    return panel_.y_label;
  }

  // Pixel polylines of every series (split where points are missing), bar rectangles and
  // marker dots; and points (every ~2 px along lines, over bars and marker guides) that legend
  // and labels should not cover.
  void BuildGeometry() {
    occupied_.clear();
    bar_boxes_.clear();
    if (HasBars()) {
      const BarSeries& bars = *panel_.bars;
      const double unit = plot_.width() / (x_.hi - x_.lo);
      // Narrow bars touch, so that rounding does not make their gaps uneven.
      const double gap = unit >= 6 ? 0.2 * unit : 0;
      const double base = y_.log ? plot_.y1 : std::clamp(YPx(y_, 0), plot_.y0, plot_.y1);
      for (size_t i = 0; i < bars.values.size(); ++i) {
        double t = y_.Transform(bars.values[i]);
        if (!Finite(t)) continue;
        double top = std::clamp(YPx(y_, t), plot_.y0, plot_.y1);
        // Whole-pixel edges: crisp, and touching bars share them (no lighter seams).
        const double x0 = std::round(XPx(i - 0.5) + gap / 2);
        const double x1 = std::max(x0 + 1, std::round(XPx(i + 0.5) - gap / 2));
        if (!Finite(top) || !Finite(x0) || !Finite(x1)) continue;  // absurd ranges
        bar_boxes_.push_back(
            {i, Box{x0, std::min(top, base), x1, std::max(top, base)}, top <= base});
        for (double y = std::min(top, base); y < std::max(top, base); y += 2) {
          for (double x = x0; x < x1; x += 2) occupied_.push_back({x, y});
        }
      }
    }
    runs_.assign(panel_.lines.size(), {});
    for (size_t i = 0; i < panel_.lines.size(); ++i) {
      const Series& series = panel_.lines[i];
      const Axis& axis = YAxis(series);
      std::vector<Point> run;
      for (size_t j = 0; j < series.x.size(); ++j) {
        const Point p{XPx(series.x[j]), YPx(axis, axis.Transform(series.y[j]))};
        // Missing points (and absurd ones, far off the canvas) break the line.
        if (!Finite(p.x) || !Finite(p.y) || std::abs(p.x) > 1e6 || std::abs(p.y) > 1e6) {
          if (!run.empty()) runs_[i].push_back(std::move(run));
          run.clear();
          continue;
        }
        run.push_back(p);
      }
      if (!run.empty()) runs_[i].push_back(std::move(run));
      for (const auto& r : runs_[i]) {
        for (size_t j = 0; j < r.size(); ++j) {
          occupied_.push_back(r[j]);
          if (j + 1 == r.size()) break;
          double len = std::hypot(r[j + 1].x - r[j].x, r[j + 1].y - r[j].y);
          int steps = std::min(10000, static_cast<int>(len / 2));
          for (int k = 1; k < steps; ++k) {
            double t = static_cast<double>(k) / steps;
            occupied_.push_back(
                {r[j].x + t * (r[j + 1].x - r[j].x), r[j].y + t * (r[j + 1].y - r[j].y)});
          }
        }
      }
    }
    PlaceMarkers();
  }

  void DrawGrid() {
    const int gw = std::max(1, m_.s / 2);
    for (double t : y_.ticks) {
      double y = std::floor(YPx(y_, t));
      canvas_->FillRect(plot_.x0, y, plot_.x1, y + gw, kGridColor);
    }
    if (!categorical_) {
      for (double t : x_.ticks) {
        double x = std::floor(XPx(t));
        canvas_->FillRect(x, plot_.y0, x + gw, plot_.y1, kGridColor);
      }
    }
  }

  void DrawBars() {
    for (const BarBox& bar : bar_boxes_) {
      const Box& b = bar.box;
      canvas_->FillRect(b.x0, b.y0, b.x1, b.y1, panel_.bars->rgb);
      if (show_bar_values_) {
        std::string text = FormatValue(panel_.bars->values[bar.index]);
        canvas_->DrawText(text, XPx(static_cast<double>(bar.index)),
                          bar.up ? b.y0 - m_.gap : b.y1 + m_.gap, TextStyle{m_.font},
                          Align::kCenter, bar.up ? Align::kEnd : Align::kStart);
      }
    }
  }

  void DrawFrameAndTicks() {
    const int aw = AxisWidth();
    const Box& p = plot_;
    canvas_->FillRect(p.x0 - aw, p.y0 - aw, p.x1 + aw, p.y0, kAxisColor);
    canvas_->FillRect(p.x0 - aw, p.y1, p.x1 + aw, p.y1 + aw, kAxisColor);
    canvas_->FillRect(p.x0 - aw, p.y0, p.x0, p.y1, kAxisColor);
    canvas_->FillRect(p.x1, p.y0, p.x1 + aw, p.y1, kAxisColor);
    const TextStyle style{m_.font};
    for (size_t i = 0; i < y_.ticks.size(); ++i) {
      double y = std::floor(YPx(y_, y_.ticks[i]));
      canvas_->FillRect(p.x0 - aw - m_.tick_len, y, p.x0 - aw, y + aw, kAxisColor);
      canvas_->DrawText(y_.labels[i], p.x0 - aw - m_.tick_len - m_.gap, y + aw / 2.0, style,
                        Align::kEnd, Align::kCenter);
    }
    for (double t : y_.minor_ticks) {
      double y = std::floor(YPx(y_, t));
      canvas_->FillRect(p.x0 - aw - m_.tick_len / 2, y, p.x0 - aw, y + aw, kAxisColor);
    }
    if (right_used_) {
      for (double t : y2_.minor_ticks) {
        double y = std::floor(YPx(y2_, t));
        canvas_->FillRect(p.x1 + aw, y, p.x1 + aw + m_.tick_len / 2, y + aw, kAxisColor);
      }
      for (size_t i = 0; i < y2_.ticks.size(); ++i) {
        double y = std::floor(YPx(y2_, y2_.ticks[i]));
        canvas_->FillRect(p.x1 + aw, y, p.x1 + aw + m_.tick_len, y + aw, kAxisColor);
        canvas_->DrawText(y2_.labels[i], p.x1 + aw + m_.tick_len + m_.gap, y + aw / 2.0, style,
                          Align::kStart, Align::kCenter);
      }
    }
    for (size_t i = 0; i < x_.ticks.size(); ++i) {
      double x = std::floor(XPx(x_.ticks[i]));
      canvas_->FillRect(x, p.y1 + aw, x + aw, p.y1 + aw + m_.tick_len, kAxisColor);
      canvas_->DrawText(x_.labels[i], x + aw / 2.0, p.y1 + aw + m_.tick_len + m_.gap, style,
                        Align::kCenter, Align::kStart);
    }
  }

  // Marker dots, with their dotted guides down to the x axis marked as occupied.
  void PlaceMarkers() {
    markers_.clear();
    const double radius = 4.0 * m_.s;
    for (const Series& series : panel_.lines) {
      if (series.marker_index < 0) continue;
      const size_t i = static_cast<size_t>(series.marker_index);
      const Axis& axis = YAxis(series);
      double ty = axis.Transform(series.y[i]);
      if (!Finite(series.x[i]) || !Finite(ty)) continue;
      Point c{XPx(series.x[i]), YPx(axis, ty)};
      if (!plot_.Contains(c)) continue;
      markers_.push_back(
          {c, radius, series.marker_label.empty() ? FormatValue(series.y[i]) : series.marker_label,
           series.rgb, Box{}});
      for (double y = c.y - radius; y < plot_.y1; y += 2) occupied_.push_back({c.x, y});
      for (double x = c.x - radius; x <= c.x + radius; x += 2) occupied_.push_back({x, c.y});
    }
  }

  // Each marker's label goes in the first corner around its dot that stays inside the plot and
  // covers the fewest lines, bars, other markers, labels and the legend.
  void PlaceMarkerLabels() {
    std::vector<Box> placed;
    if (has_legend_ && legend_rows_.empty()) placed.push_back(legend_box_);
    for (Marker& mk : markers_) {
      const double pad = 2.0 * m_.s;
      const double w = TextWidth(mk.label) + 2 * pad, h = TextHeight() + 2 * pad;
      const double off = mk.radius + 2.0 * m_.s;
      const std::array<Box, 4> candidates = {
          Box{mk.at.x + off, mk.at.y - off - h, mk.at.x + off + w, mk.at.y - off},
          Box{mk.at.x - off - w, mk.at.y - off - h, mk.at.x - off, mk.at.y - off},
          Box{mk.at.x + off, mk.at.y + off, mk.at.x + off + w, mk.at.y + off + h},
          Box{mk.at.x - off - w, mk.at.y + off, mk.at.x - off, mk.at.y + off + h}};
      const Box* best = &candidates[0];
      double best_score = std::numeric_limits<double>::infinity();
      for (const Box& b : candidates) {
        double score = 0;
        if (b.x0 < plot_.x0 || b.x1 > plot_.x1 || b.y0 < plot_.y0 || b.y1 > plot_.y1) score += 1e6;
        for (const Box& q : placed) score += Overlap(b, q);
        for (const Marker& other : markers_) {
          score += Overlap(b, Box{other.at.x - other.radius, other.at.y - other.radius,
                                  other.at.x + other.radius, other.at.y + other.radius});
        }
        for (const Point& pt : occupied_) score += b.Contains(pt) ? 1 : 0;
        if (score < best_score) {
          best_score = score;
          best = &b;
        }
      }
      mk.label_box = Box{std::round(best->x0), std::round(best->y0), std::round(best->x1),
                         std::round(best->y1)};
      placed.push_back(mk.label_box);
    }
  }

  // Each marker: a faint dotted guide down to the x axis, a dot, its label.
  void DrawMarkers() {
    const double gw = std::max(1, m_.s);
    for (const Marker& mk : markers_) {
      const Point c = mk.at;
      for (double y = c.y + mk.radius + 2 * m_.s; y < plot_.y1; y += 4 * m_.s) {
        canvas_->FillRect(std::floor(c.x), y, std::floor(c.x) + gw,
                          std::min(y + 2 * m_.s, plot_.y1), mk.rgb, 0.7);
      }
    }
    for (const Marker& mk : markers_) {
      canvas_->FillDisc(mk.at.x, mk.at.y, mk.radius + 1.5 * m_.s, kWhite);
      canvas_->FillDisc(mk.at.x, mk.at.y, mk.radius, mk.rgb);
    }
    for (const Marker& mk : markers_) {
      const Box& b = mk.label_box;
      canvas_->FillRect(b.x0, b.y0, b.x1, b.y1, kWhite, 0.85);
      canvas_->StrokeBox(b, mk.rgb);
      canvas_->DrawText(mk.label, b.x0 + 2.0 * m_.s, b.y0 + 2.0 * m_.s, TextStyle{m_.font},
                        Align::kStart, Align::kStart);
    }
  }

  static double Overlap(const Box& a, const Box& b) {
    double w = std::min(a.x1, b.x1) - std::max(a.x0, b.x0);
    double h = std::min(a.y1, b.y1) - std::max(a.y0, b.y0);
    return w > 0 && h > 0 ? w * h : 0;
  }

  void DrawLabels() {
    const TextStyle style{m_.font};
    const double cx = (plot_.x0 + plot_.x1) / 2, cy = (plot_.y0 + plot_.y1) / 2;
    if (!panel_.title.empty()) {
      // A title wider than its panel is shortened with "..." rather than spill into the next.
      const double room = area_.width() - 2 * m_.pad;
      canvas_->DrawText(canvas_->FitText(panel_.title, room, m_.title_font), cx, area_.y0 + m_.pad,
                        TextStyle{m_.title_font}, Align::kCenter, Align::kStart);
    }
    if (!panel_.x_label.empty()) {
      double y = plot_.y1 + AxisWidth() + m_.tick_len + m_.gap + TextHeight() + m_.gap;
      canvas_->DrawText(panel_.x_label, cx, y, style, Align::kCenter, Align::kStart);
    }
    if (!LeftLabel().empty()) {
      canvas_->DrawTextVertical(LeftLabel(), area_.x0 + m_.pad + CapHeight() / 2.0, cy, style);
    }
    if (right_used_ && !panel_.y2_label.empty()) {
      canvas_->DrawTextVertical(panel_.y2_label, area_.x1 - m_.pad - CapHeight() / 2.0, cy, style);
    }
  }

  struct LegendEntry {
    std::string name;
    uint32_t rgb;
    bool bar, dashed;
  };

  // The names shortened with "..." to what one entry's row of the panel holds (a long one ran
  // across the next panel).
  std::vector<LegendEntry> LegendEntries() const {
    const double room = std::max(0.0, area_.width() - 2.0 * m_.pad - 2 * LegendInner() - LegendSample() - m_.gap);
    std::vector<LegendEntry> entries;
    if (panel_.bars && !panel_.bars->name.empty()) {
      entries.push_back({canvas_->FitText(panel_.bars->name, room, m_.font), panel_.bars->rgb, true, false});
    }
    for (const Series& s : panel_.lines) {
      if (!s.name.empty()) entries.push_back({canvas_->FitText(s.name, room, m_.font), s.rgb, false, s.dashed});
    }
    return entries;
  }

  double LegendInner() const { return m_.gap + m_.s; }
  double LegendRow() const { return TextHeight() + m_.gap; }
  double LegendSample() const { return 22.0 * m_.s; }

  // Width and height of the legend box.
  Point LegendSize() const {
    std::vector<LegendEntry> entries = LegendEntries();
    double text_w = 0;
    for (const LegendEntry& e : entries) text_w = std::max<double>(text_w, TextWidth(e.name));
    return {std::round(2 * LegendInner() + LegendSample() + m_.gap + text_w),
            std::round(2 * LegendInner() + entries.size() * LegendRow() - m_.gap)};
  }

  // matplotlib's loc="best": of the positions on a 5x5 grid inside the plot (corners first,
  // then edge middles, then the rest), the first covering the fewest data points, counting
  // those within a line width of the box too.
  Box LegendBox(size_t* covered) const {
    const Point size = LegendSize();
    const double inset = 2.0 * m_.gap;
    const double free_w = plot_.width() - 2 * inset - size.x;
    const double free_h = plot_.height() - 2 * inset - size.y;
    // (column, row) in quarters of the free space; 4 = right / bottom.
    std::vector<std::pair<int, int>> order = {{4, 0}, {0, 0}, {0, 4}, {4, 4}, {0, 2},
                                              {4, 2}, {2, 4}, {2, 0}, {2, 2}};
    for (int r = 0; r <= 4; ++r) {
      for (int c = 0; c <= 4; ++c) {
        if (std::find(order.begin(), order.end(), std::make_pair(c, r)) == order.end()) {
          order.push_back({c, r});
        }
      }
    }
    Box best;
    *covered = std::numeric_limits<size_t>::max();
    if (free_w < 0 || free_h < 0) {  // larger than the plot: counts as covering everything
      best = Box{plot_.x0, plot_.y0, plot_.x0 + size.x, plot_.y0 + size.y};
      return best;
    }
    for (auto [c, r] : order) {
      double x0 = std::round(plot_.x0 + inset + free_w * c / 4);
      double y0 = std::round(plot_.y0 + inset + free_h * r / 4);
      Box b{x0, y0, x0 + size.x, y0 + size.y};
      const double margin = m_.line_width + 2.0 * m_.s;
      const Box near{b.x0 - margin, b.y0 - margin, b.x1 + margin, b.y1 + margin};
      size_t count = 0;
      for (const Point& pt : occupied_) count += near.Contains(pt) ? 1 : 0;
      if (count < *covered) {
        *covered = count;
        best = b;
      }
    }
    return best;
  }

  double LegendEntryWidth(const LegendEntry& e) const {
    return LegendSample() + m_.gap + TextWidth(e.name);
  }

  // Entry indexes per row when the legend goes under the plot: as many per row as fit the
  // panel's width.
  std::vector<std::vector<size_t>> LegendRowsBelow() const {
    const std::vector<LegendEntry> entries = LegendEntries();
    const double max_w = area_.width() - 2.0 * m_.pad;
    const double spacing = 3.0 * m_.gap;
    std::vector<std::vector<size_t>> rows;
    double row_w = 0;
    for (size_t i = 0; i < entries.size(); ++i) {
      double w = LegendEntryWidth(entries[i]);
      if (rows.empty() || row_w + spacing + w > max_w) {
        rows.push_back({});
        row_w = -spacing;
      }
      rows.back().push_back(i);
      row_w += spacing + w;
    }
    return rows;
  }

  // A line (or bar) sample at x, then the name, vertically centred on cy.
  void DrawLegendEntry(const LegendEntry& e, const Box& clip, double x, double cy) {
    const int s = m_.s;
    const double sw = LegendSample();
    if (e.bar) {
      canvas_->FillRect(x + 4 * s, cy - 3.5 * s, x + sw - 4 * s, cy + 3.5 * s, e.rgb);
    } else {
      canvas_->DrawPolyline(clip, {{{x, cy}, {x + sw, cy}}}, m_.line_width, e.rgb, e.dashed);
    }
    canvas_->DrawText(e.name, x + sw + m_.gap, cy, TextStyle{m_.font}, Align::kStart,
                      Align::kCenter);
  }

  void DrawLegend() {
    if (!has_legend_) return;
    const std::vector<LegendEntry> entries = LegendEntries();
    if (!legend_rows_.empty()) {
      const double spacing = 3.0 * m_.gap;
      double y = plot_.y1 + AxisWidth() + m_.tick_len + m_.gap + TextHeight() + 2 * m_.gap;
      if (!panel_.x_label.empty()) y += TextHeight() + m_.gap;
      for (const std::vector<size_t>& row : legend_rows_) {
        double row_w = -spacing;
        for (size_t i : row) row_w += spacing + LegendEntryWidth(entries[i]);
        double x = (plot_.x0 + plot_.x1 - row_w) / 2;
        x = std::round(std::max(area_.x0 + m_.pad, std::min(x, area_.x1 - m_.pad - row_w)));
        for (size_t i : row) {
          DrawLegendEntry(entries[i], area_, x, y + CapHeight() / 2.0);
          x += LegendEntryWidth(entries[i]) + spacing;
        }
        y += LegendRow();
      }
      return;
    }
    const Box& b = legend_box_;
    canvas_->FillRect(b.x0, b.y0, b.x1, b.y1, kWhite, 0.9);
    canvas_->StrokeBox(b, kLegendEdgeColor);
    for (size_t i = 0; i < entries.size(); ++i) {
      DrawLegendEntry(entries[i], b, b.x0 + LegendInner(),
                      b.y0 + LegendInner() + i * LegendRow() + CapHeight() / 2.0);
    }
  }

  struct Marker {
    Point at;
    double radius;
    std::string label;
    uint32_t rgb;
    Box label_box;
  };

  Canvas* canvas_;
  const Panel& panel_;
  const Metrics& m_;
  Box area_, plot_;
  Axis x_, y_, y2_;
  bool right_used_ = false;
  bool categorical_ = false;
  bool show_bar_values_ = false;
  std::vector<std::vector<std::vector<Point>>> runs_;  // per series, per unbroken run
  std::vector<Point> occupied_;
  std::vector<Marker> markers_;
  struct BarBox {
    size_t index;
    Box box;
    bool up;  // value >= the baseline
  };
  std::vector<BarBox> bar_boxes_;
  bool has_legend_ = false;
  Box legend_box_;                                // inside the plot, when legend_rows_ is empty
  std::vector<std::vector<size_t>> legend_rows_;  // else: entries per row under the plot
};

}  // namespace

uint32_t PaletteColor(int index) {
  static constexpr uint32_t kTab10[10] = {0x1F77B4, 0xFF7F0E, 0x2CA02C, 0xD62728, 0x9467BD,
                                          0x8C564B, 0xE377C2, 0x7F7F7F, 0xBCBD22, 0x17BECF};
  return kTab10[((index % 10) + 10) % 10];
}

std::vector<std::string> AxisTickLabelsForTest(double lo, double hi, bool log_scale, int target) {
  Axis axis;
  axis.log = log_scale;
  axis.lo = axis.Transform(lo);
  axis.hi = axis.Transform(hi);
  if (log_scale) {
    MakeLogTicks(&axis, target);
  } else {
    MakeLinearTicks(&axis, target, 0);
  }
  return axis.labels;
}

absl::StatusOr<std::string> EncodePng(int width, int height, absl::string_view rgb) {
  if (width <= 0 || height <= 0 ||
      rgb.size() != static_cast<size_t>(width) * static_cast<size_t>(height) * 3) {
    return absl::InvalidArgumentError(absl::StrCat("EncodePng: ", rgb.size(), " bytes of RGB for ",
                                                   width, "x", height, " pixels (expected ",
                                                   3LL * width * height, ")"));
  }
  AVIARY_ASSIGN_OR_RETURN(SurfacePtr surface, CreateSurface(width, height));
  cairo_surface_flush(surface.get());
  unsigned char* data = cairo_image_surface_get_data(surface.get());
  const int stride = cairo_image_surface_get_stride(surface.get());
  for (int y = 0; y < height; ++y) {
    // RGB24 pixels are native-endian 32-bit words, 0x00RRGGBB.
    auto* row = reinterpret_cast<uint32_t*>(data + static_cast<size_t>(y) * stride);
    const auto* in =
        reinterpret_cast<const unsigned char*>(rgb.data()) + static_cast<size_t>(y) * width * 3;
    for (int x = 0; x < width; ++x) {
      row[x] = (uint32_t{in[3 * x]} << 16) | (uint32_t{in[3 * x + 1]} << 8) | in[3 * x + 2];
    }
  }
  cairo_surface_mark_dirty(surface.get());
  return SurfaceToPng(surface.get());
}

absl::StatusOr<std::string> RenderPng(const Figure& figure) {
  for (auto [name, value] : {std::pair<const char*, int>{"width", figure.width},
                             std::pair<const char*, int>{"height", figure.height}}) {
    if (value < kMinSidePx || value > kMaxSidePx) {
      return absl::InvalidArgumentError(absl::StrCat(
          "figure ", name, " ", value, " px is outside [", kMinSidePx, ", ", kMaxSidePx, "]"));
    }
  }
  if (figure.panels.empty()) return absl::InvalidArgumentError("figure has no panels");
  if (figure.columns < 0) {
    return absl::InvalidArgumentError(absl::StrCat("figure columns ", figure.columns, " < 0"));
  }
  if (figure.text_scale < 0 || figure.text_scale > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("figure text_scale ", figure.text_scale, " is outside [0, 16]"));
  }
  for (size_t i = 0; i < figure.panels.size(); ++i) {
    AVIARY_RETURN_IF_ERROR(ValidatePanel(figure.panels[i], i));
  }

  const int scale = figure.text_scale > 0
                        ? figure.text_scale
                        : std::clamp(static_cast<int>(std::lround(
                                         std::min(figure.width / 640.0, figure.height / 320.0))),
                                     1, 16);
  const Metrics m = MakeMetrics(scale);
  AVIARY_ASSIGN_OR_RETURN(std::unique_ptr<Canvas> canvas,
                          Canvas::Create(figure.width, figure.height));
  double top = 0;
  if (!figure.title.empty()) {
    canvas->DrawText(canvas->FitText(figure.title, figure.width - 2.0 * m.pad, m.figure_font),
                     figure.width / 2.0, m.pad, TextStyle{m.figure_font}, Align::kCenter,
                     Align::kStart);
    top = m.pad + canvas->CapHeight(m.figure_font) + m.gap;
  }
  const int n = static_cast<int>(figure.panels.size());
  const int cols = figure.columns == 0 ? n : std::min(figure.columns, n);
  const int rows = (n + cols - 1) / cols;
  const double cell_w = static_cast<double>(figure.width) / cols;
  const double cell_h = (figure.height - top) / rows;
  for (int i = 0; i < n; ++i) {
    const int r = i / cols, c = i % cols;
    Box area{std::round(c * cell_w), std::round(top + r * cell_h), std::round((c + 1) * cell_w),
             std::round(top + (r + 1) * cell_h)};
    PanelRenderer renderer(canvas.get(), figure.panels[i], m);
    absl::Status status = renderer.Render(area);
    if (!status.ok()) {
      return Annotate(status, absl::StrCat(PanelName(figure.panels[i], i), " of a ", figure.width,
                                           "x", figure.height, " figure"));
    }
  }
  return canvas->Encode();
}

absl::Status WritePng(const Figure& figure, const std::string& path) {
  const std::string context = absl::StrCat("WritePng ", path);
  absl::StatusOr<std::string> png = RenderPng(figure);
  if (!png.ok()) return Annotate(png.status(), context);
  // A symbolic link as the PNG (`--plot link.png`) is written through: its target is replaced.
  return Annotate(WriteOutputFileAtomically(path, *png), context);
}

}  // namespace aviary::common
