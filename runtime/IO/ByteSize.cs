// One size parser for both sides: the runtime compiles this file, and the generator links it
// (generator/LoraCompiler.Generator.csproj) to read trainer.memory_budget, so a size means the same
// in a model JSON as on the command line. netstandard2.0 C#: no spans, ranges or regexes.
using System;
using System.Globalization;

#if LORA_GENERATOR
namespace LoraCompiler.Generator
#else
namespace LoraCompiler.Runtime.IO
#endif
{
    /// <summary>
    /// Sizes in bytes as people write them: a number of bytes, or a number with a unit, decimal
    /// (<c>KB</c>, <c>MB</c>, <c>GB</c>, <c>TB</c>: powers of 1000, as Hugging Face and disk makers count) or
    /// binary (<c>KiB</c>, <c>MiB</c>, <c>GiB</c>, <c>TiB</c>: powers of 1024). Case does not matter; a space
    /// may separate the number and the unit; a fraction is rounded down to whole bytes.
    /// </summary>
    public static class ByteSize
    {
        /// <summary>The examples error messages give.</summary>
        public const string Examples = "512MB, 1.5GB, 256MiB or a number of bytes";

        /// <summary>The size <paramref name="text"/> gives, or null with the reason in <paramref name="problem"/>.</summary>
        public static long? TryParse(string text, out string problem)
        {
            problem = "";
            string s = (text ?? "").Trim();
            int end = 0;
            while (end < s.Length && (char.IsDigit(s[end]) || s[end] == '.'))
                end++;
            string number = s.Substring(0, end), unit = s.Substring(end).Trim();
            if (number.Length == 0 || number.StartsWith(".", StringComparison.Ordinal) || number.EndsWith(".", StringComparison.Ordinal)
                || !double.TryParse(number, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value))
            {
                problem = $"'{text}' is not a size like {Examples}";
                return null;
            }
            double scale = unit.ToUpperInvariant() switch
            {
                "" or "B" => 1,
                "KB" => 1e3, "MB" => 1e6, "GB" => 1e9, "TB" => 1e12,
                "KIB" => 1L << 10, "MIB" => 1L << 20, "GIB" => 1L << 30, "TIB" => 1L << 40,
                _ => 0,
            };
            if (scale == 0)
            {
                problem = $"'{text}': unknown unit '{unit}' (KB, MB, GB are powers of 1000; KiB, MiB, GiB of 1024)";
                return null;
            }
            double bytes = Math.Floor(value * scale);
            if (!(bytes >= 1) || bytes >= 9.2e18)
            {
                problem = $"'{text}' is not a positive size that fits 64 bits";
                return null;
            }
            return (long)bytes;
        }

        /// <summary>The size <paramref name="text"/> gives; a <see cref="FormatException"/> says why it is not one.</summary>
        public static long Parse(string text) => TryParse(text, out string problem) ?? throw new FormatException(problem);

        /// <summary>Bytes in the unit a person reads best: "512.0 MB" (decimal), "488.3 MiB" with <paramref name="binary"/>.</summary>
        public static string Format(long bytes, bool binary = false)
        {
            double unit = binary ? 1024 : 1000;
            string[] names = binary ? new[] { "B", "KiB", "MiB", "GiB", "TiB" } : new[] { "B", "KB", "MB", "GB", "TB" };
            double value = bytes;
            int i = 0;
            while (Math.Abs(value) >= unit && i < names.Length - 1)
            {
                value /= unit;
                i++;
            }
            return i == 0
                ? bytes.ToString(CultureInfo.InvariantCulture) + " B"
                : value.ToString("F1", CultureInfo.InvariantCulture) + " " + names[i];
        }
    }
}
