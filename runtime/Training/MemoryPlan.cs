namespace LoraCompiler.Runtime.Training;

/// <summary>
/// One buffer of a trainer's static memory plan, written by the generator. Its size in floats is
/// Fixed + PerToken·T for a sequence of T tokens (nothing grows as T²: attention keeps one
/// log-sum-exp per row). A buffer that
/// <paramref name="SharesWith"/> another lives in that one's memory (their lifetimes do not
/// overlap) and adds nothing to the total.
/// </summary>
public sealed record BufferPlan(string Name, BufferRole Role, long Fixed, long PerToken, string Purpose, string? SharesWith = null)
{
    public long Elements(int sequence) => SharesWith is null ? Fixed + PerToken * sequence : 0;
    public long Bytes(int sequence) => Elements(sequence) * sizeof(float);
}

/// <summary>
/// The memory plan evaluated for one maximum sequence length: every buffer of a step, all live at once.
/// A <see cref="BufferRole.KeptActivations"/> buffer counts once for each of the <paramref name="KeptLayers"/>
/// layers that keep their activations from forward to backward (a memory budget's choice; none by default).
/// </summary>
public sealed record MemoryPlan(int Sequence, IReadOnlyList<BufferPlan> Buffers, int KeptLayers = 0)
{
    public long TotalBytes => Buffers.Sum(Bytes);

    public long BytesOf(BufferRole role) => Buffers.Where(b => b.Role == role).Sum(Bytes);

    private long Bytes(BufferPlan b) => b.Bytes(Sequence) * (b.Role == BufferRole.KeptActivations ? KeptLayers : 1);

    /// <summary>A table with one line per buffer and a total per role, for the <c>plan</c> command.</summary>
    public string Format()
    {
        var lines = new List<string> { $"{"buffer",-16} {"role",-15} {"floats",14} {"MiB",10}  purpose" };
        foreach (var b in Buffers)
            lines.Add(b.SharesWith is null
                ? $"{b.Name,-16} {b.Role,-15} {b.Elements(Sequence),14:N0} {Mib(b.Bytes(Sequence)),10:F3}  {b.Purpose}" +
                  (b.Role == BufferRole.KeptActivations ? $" (× {KeptLayers} kept layers)" : "")
                : $"{b.Name,-16} {b.Role,-15} {"in " + b.SharesWith,14} {"",10}  {b.Purpose}");
        lines.Add("");
        foreach (var role in Enum.GetValues<BufferRole>())
            lines.Add($"{"total",-16} {role,-15} {"",14} {Mib(BytesOf(role)),10:F3}");
        lines.Add($"{"total",-16} {"all",-15} {"",14} {Mib(TotalBytes),10:F3}");
        return string.Join(Environment.NewLine, lines);
    }

    private static double Mib(long bytes) => bytes / (1024.0 * 1024.0);
}
