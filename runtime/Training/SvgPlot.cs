using System.Globalization;
using System.Text;
using LoraCompiler.Runtime.IO;

namespace LoraCompiler.Runtime.Training;

/// <summary>Line charts as standalone SVG: one or more named series of (x, y) points, optionally with labelled markers.</summary>
public static class SvgPlot
{
    private static readonly string[] Colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

    /// <summary>One point, with a label drawn beside its marker (or null).</summary>
    public readonly record struct Point(double X, double Y, string? Label = null);

    /// <summary>A named series of points, joined by a line in their order.</summary>
    public sealed record Series(string Name, IReadOnlyList<Point> Points);

    public static void Write(string path, string title, string xLabel, string yLabel,
        IReadOnlyList<(string Name, IReadOnlyList<(double X, double Y)> Points)> series) =>
        Write(path, title, xLabel, yLabel, series.Select(s => new Series(s.Name, s.Points.Select(p => new Point(p.X, p.Y)).ToList())).ToList());

    /// <summary>
    /// Writes the chart to <paramref name="path"/> (atomically). With <paramref name="markers"/> every point gets a
    /// dot and its label; with <paramref name="logX"/> the x axis is logarithmic (for values spanning decades).
    /// </summary>
    public static void Write(string path, string title, string xLabel, string yLabel, IReadOnlyList<Series> series,
        bool markers = false, bool logX = false)
    {
        const int width = 720, height = 440, left = 70, right = 170, top = 40, bottom = 50;
        double Tx(double x) => logX ? Math.Log10(Math.Max(x, 1e-300)) : x;
        var all = series.SelectMany(s => s.Points).Where(p => double.IsFinite(p.Y) && double.IsFinite(Tx(p.X))).ToList();
        double x0 = all.Count > 0 ? all.Min(p => Tx(p.X)) : 0, x1 = all.Count > 0 ? all.Max(p => Tx(p.X)) : 1;
        double y0 = all.Count > 0 ? all.Min(p => p.Y) : 0, y1 = all.Count > 0 ? all.Max(p => p.Y) : 1;
        if (x1 <= x0) x1 = x0 + 1;
        if (y1 <= y0) y1 = y0 + 1;
        double pad = (y1 - y0) * 0.05;
        (y0, y1) = (y0 - pad, y1 + pad);
        if (markers)
        {
            double xpad = (x1 - x0) * 0.05;
            (x0, x1) = (x0 - xpad, x1 + xpad);
        }
        string X(double x) => F(left + (Tx(x) - x0) / (x1 - x0) * (width - left - right));
        string Y(double y) => F(height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom));

        var svg = new StringBuilder();
        svg.AppendLine($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">");
        svg.AppendLine($"<rect width=\"{width}\" height=\"{height}\" fill=\"white\"/>");
        svg.AppendLine($"<text x=\"{width / 2}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{Escape(title)}</text>");
        for (int i = 0; i <= 5; i++)
        {
            double y = y0 + (y1 - y0) * i / 5, tx = x0 + (x1 - x0) * i / 5, x = logX ? Math.Pow(10, tx) : tx;
            svg.AppendLine($"<line x1=\"{left}\" y1=\"{Y(y)}\" x2=\"{width - right}\" y2=\"{Y(y)}\" stroke=\"#ddd\"/>");
            svg.AppendLine($"<text x=\"{left - 6}\" y=\"{Y(y)}\" text-anchor=\"end\" dominant-baseline=\"middle\">{y.ToString("G3", CultureInfo.InvariantCulture)}</text>");
            svg.AppendLine($"<text x=\"{X(x)}\" y=\"{height - bottom + 16}\" text-anchor=\"middle\">{x.ToString(logX ? "G3" : "G4", CultureInfo.InvariantCulture)}</text>");
        }
        svg.AppendLine($"<rect x=\"{left}\" y=\"{top}\" width=\"{width - left - right}\" height=\"{height - top - bottom}\" fill=\"none\" stroke=\"#444\"/>");
        svg.AppendLine($"<text x=\"{(left + width - right) / 2}\" y=\"{height - 12}\" text-anchor=\"middle\">{Escape(xLabel + (logX ? " (log scale)" : ""))}</text>");
        svg.AppendLine($"<text transform=\"translate(18,{(top + height - bottom) / 2}) rotate(-90)\" text-anchor=\"middle\">{Escape(yLabel)}</text>");
        for (int s = 0; s < series.Count; s++)
        {
            string color = Colors[s % Colors.Length];
            var shown = series[s].Points.Where(p => double.IsFinite(p.Y) && double.IsFinite(Tx(p.X))).ToList();
            svg.AppendLine($"<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.6\" points=\"{string.Join(" ", shown.Select(p => $"{X(p.X)},{Y(p.Y)}"))}\"/>");
            if (markers)
                foreach (var p in shown)
                {
                    svg.AppendLine($"<circle cx=\"{X(p.X)}\" cy=\"{Y(p.Y)}\" r=\"4\" fill=\"{color}\"/>");
                    if (p.Label is { } label)
                        svg.AppendLine($"<text x=\"{X(p.X)}\" y=\"{Y(p.Y)}\" dx=\"6\" dy=\"-6\" font-size=\"10\" fill=\"{color}\">{Escape(label)}</text>");
                }
            int ly = top + 10 + s * 20;
            svg.AppendLine($"<line x1=\"{width - right + 12}\" y1=\"{ly}\" x2=\"{width - right + 32}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/>");
            svg.AppendLine($"<text x=\"{width - right + 38}\" y=\"{ly}\" dominant-baseline=\"middle\">{Escape(series[s].Name)}</text>");
        }
        svg.AppendLine("</svg>");
        AtomicFile.WriteAllText(path, svg.ToString());
    }

    private static string F(double v) => v.ToString("F1", CultureInfo.InvariantCulture);
    private static string Escape(string s) => s.Replace("&", "&amp;").Replace("<", "&lt;").Replace(">", "&gt;");
}
