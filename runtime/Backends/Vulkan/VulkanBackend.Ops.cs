using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>The elementwise kernels, the embedding gather, the norms and RoPE.</summary>
public sealed unsafe partial class VulkanBackend
{
    // ---------------------------------------------------------------- elementwise

    public void Zero(Tensor t, long n) => Elementwise(Kernels.Zero, n, [Vulkan(t, n, nameof(t))]);

    public void Copy(Tensor dst, Tensor src, long n) => Elementwise(Kernels.Copy, n, [Vulkan(dst, n, nameof(dst)), Vulkan(src, n, nameof(src))]);

    /// <summary>
    /// A transfer (vkCmdCopyBuffer) in order with the kernels around it, one region per stretch that lies
    /// in one part of each tensor, so either may be split. Overlapping ranges of one tensor are refused.
    /// </summary>
    public void CopyRange(Tensor dst, long dstOffset, Tensor src, long srcOffset, long n)
    {
        if (dstOffset < 0 || srcOffset < 0 || n < 0)
            throw new ArgumentOutOfRangeException(nameof(n), "offsets and lengths must not be negative.");
        var d = Vulkan(dst, 0, nameof(dst));
        var s = Vulkan(src, 0, nameof(src));
        if (srcOffset > s.Length - n)
            throw new ArgumentOutOfRangeException(nameof(srcOffset), srcOffset, $"{src} holds {s.Length} floats; the copy reads [{srcOffset}, {srcOffset + n}).");
        if (dstOffset > d.Length - n)
            throw new ArgumentOutOfRangeException(nameof(dstOffset), dstOffset, $"{dst} holds {d.Length} floats; the copy writes [{dstOffset}, {dstOffset + n}).");
        if (d == s && n > 0 && srcOffset < dstOffset + n && dstOffset < srcOffset + n)
            throw new ArgumentException($"The ranges [{srcOffset}, {srcOffset + n}) and [{dstOffset}, {dstOffset + n}) of {dst} overlap.", nameof(dstOffset));
        for (long done = 0; done < n;)
        {
            long from = srcOffset + done, to = dstOffset + done;
            int sk = (int)(from / PartLength), dk = (int)(to / PartLength);
            long inSource = from - sk * PartLength, inDestination = to - dk * PartLength;
            long count = Math.Min(n - done, Math.Min(PartLength - inSource, PartLength - inDestination));
            _stream.CopyBuffer(s.Part(sk), (ulong)inSource * sizeof(float), d.Part(dk), (ulong)inDestination * sizeof(float), (ulong)count * sizeof(float));
            done += count;
        }
    }

    public void AddInPlace(Tensor dst, Tensor src, long n) => Elementwise(Kernels.Add, n, [Vulkan(dst, n, nameof(dst)), Vulkan(src, n, nameof(src))]);

    public void Scale(Tensor x, float factor, long n) =>
        Elementwise(Kernels.Scale, n, [Vulkan(x, n, nameof(x))], (count, _) => new ScaleParameters { Count = count, Factor = factor });

    /// <summary>swiglu.comp (SiLU) or geglu.comp (tanh-approximated GELU).</summary>
    public void GluForward(Tensor h, Tensor gate, Tensor up, long n, GluActivation activation) =>
        Elementwise(Glu(activation, backward: false), n, [Vulkan(h, n, nameof(h)), Vulkan(gate, n, nameof(gate)), Vulkan(up, n, nameof(up))]);

    /// <summary>swiglu_back.comp or geglu_back.comp; dUp may be dh's own tensor.</summary>
    public void GluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long n, GluActivation activation) =>
        Elementwise(Glu(activation, backward: true), n,
            [Vulkan(dGate, n, nameof(dGate)), Vulkan(dUp, n, nameof(dUp)), Vulkan(dh, n, nameof(dh)), Vulkan(gate, n, nameof(gate)), Vulkan(up, n, nameof(up))]);

    private static KernelSpec Glu(GluActivation activation, bool backward) => activation switch
    {
        GluActivation.Silu => backward ? Kernels.SwiGluBack : Kernels.SwiGlu,
        GluActivation.GeluTanh => backward ? Kernels.GeGluBack : Kernels.GeGlu,
        _ => throw new ArgumentOutOfRangeException(nameof(activation), activation, "Not a GLU activation."),
    };

    /// <summary>One dispatch per part: the tensors' parts line up, so part k of each holds the same elements.</summary>
    private void Elementwise(KernelSpec kernel, long n, VulkanTensor[] tensors) =>
        Elementwise(kernel, n, tensors, static (count, _) => new CountParameters { Count = count });

    /// <summary>
    /// As above, with the push constants <paramref name="push"/> makes for a part of <c>count</c>
    /// elements that starts at element <c>first</c> of the tensors, and, when given, one buffer every
    /// part's dispatch binds after the tensors' parts (<paramref name="shared"/>).
    /// </summary>
    private void Elementwise<T>(KernelSpec kernel, long n, VulkanTensor[] tensors, Func<uint, long, T> push, VkBuffer? shared = null)
        where T : unmanaged
    {
        Span<VkBuffer> buffers = stackalloc VkBuffer[tensors.Length + (shared is null ? 0 : 1)];
        if (shared is VkBuffer last)
            buffers[^1] = last;
        for (int k = 0; (long)k * PartLength < n; k++)
        {
            long first = (long)k * PartLength, count = Math.Min(PartLength, n - first);
            for (int i = 0; i < tensors.Length; i++)
                buffers[i] = tensors[i].Part(k);
            RunElements(kernel, push((uint)count, first), count, buffers);
        }
    }

    // ---------------------------------------------------------------- embedding, norms, RoPE

    public void EmbeddingForward(Tensor x, ReadOnlySpan<int> tokens, Tensor table, int T, int C)
    {
        var xt = Vulkan(x, (long)T * C, nameof(x));
        var q4 = table as VulkanQ4Tensor;
        if (q4 is not null)
            Check(q4, q4.Rows, C, nameof(table));
        var half = table as VulkanFloat16Tensor;
        if (half is not null)
            Check(half, half.Rows, C, nameof(table));
        long vocab = q4?.Rows ?? half?.Rows ?? Vulkan(table, 0, nameof(table)).Length / C;
        SequenceChecks.Tokens(tokens, T, vocab);
        if (q4 is null && half is null && vocab * C > uint.MaxValue)
            throw new VulkanException($"The table {table} has more than 2³² elements, which the embedding shader cannot index.");
        var x0 = Single(xt, (long)T * C);
        var ids = UploadInts(ref _tokens, tokens[..T], "token ids");
        if (q4 is not null)
        {
            foreach (var part in q4.Parts)
            {
                var push = new EmbeddingQ4Parameters
                {
                    TokenCount = (uint)T, Width = (uint)C, GroupSize = (uint)q4.GroupSize, PartFirstRow = (uint)part.FirstRow, PartRows = (uint)part.Rows,
                };
                RunElements(Kernels.EmbeddingQ4, push, (long)T * q4.WordsPerRow, [x0, ids, part.Packed.Handle, part.ScaleBias.Handle]);
            }
            return;
        }
        if (half is not null)
        {
            foreach (var part in half.Parts)
            {
                var push = new EmbeddingW16Parameters
                {
                    TokenCount = (uint)T, Width = (uint)C, Format = half.ShaderFormat, PartFirstRow = (uint)part.FirstRow, PartRows = (uint)part.Rows,
                };
                RunElements(Kernels.EmbeddingW16, push, (long)T * C, [x0, ids, part.Buffer.Handle]);
            }
            return;
        }
        var tt = Vulkan(table, 0, nameof(table));
        for (int k = 0; k < tt.PartCount; k++)
        {
            var push = new EmbeddingParameters
            {
                TokenCount = (uint)T, Width = (uint)C, PartFirst = (uint)(k * tt.PartLength), PartLength = (uint)tt.PartElements(k),
            };
            RunElements(Kernels.Embedding, push, (long)T * C, [x0, ids, tt.Part(k)]);
        }
    }

    /// <summary>rmsnorm.comp, one workgroup per row (a per-head norm passes T·heads rows of headDim).</summary>
    public void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int T, int C, float eps, float weightOffset)
    {
        long n = (long)T * C;
        var (wb, format) = StoredVector(w, C, nameof(w));
        var push = new RmsNormParameters { TokenCount = (uint)T, Width = (uint)C, Epsilon = eps, WeightOffset = weightOffset, WeightFormat = format };
        RunRows(Kernels.RmsNorm, push, T, [Single(y, n, nameof(y)), Single(rstd, T, nameof(rstd)), Single(x, n, nameof(x)), wb]);
    }

    /// <summary>rmsnorm_back.comp: without <paramref name="accumulate"/> dx's old contents are never read.</summary>
    public void RmsNormBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, Tensor rstd, int T, int C, float weightOffset, bool accumulate)
    {
        long n = (long)T * C;
        var (wb, format) = StoredVector(w, C, nameof(w));
        var push = new RmsNormBackParameters
        {
            TokenCount = (uint)T, Width = (uint)C, WeightOffset = weightOffset, Accumulate = accumulate ? 1u : 0u, WeightFormat = format,
        };
        RunRows(Kernels.RmsNormBack, push, T,
            [Single(dx, n, nameof(dx)), Single(dy, n, nameof(dy)), Single(x, n, nameof(x)), wb, Single(rstd, T, nameof(rstd))]);
    }

    public void RopeForward(Tensor x, Tensor cos, Tensor sin, int T, int heads, int headDim) => Rope(Kernels.Rope, x, cos, sin, 0, T, heads, headDim);

    /// <summary>rope.comp with the tables read from row <paramref name="position"/> on (decoding: the newest rows of a sequence).</summary>
    public void RopeForwardAt(Tensor x, Tensor cos, Tensor sin, int position, int T, int heads, int headDim)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        Rope(Kernels.Rope, x, cos, sin, position, T, heads, headDim);
    }

    public void RopeBackward(Tensor dx, Tensor cos, Tensor sin, int T, int heads, int headDim) => Rope(Kernels.RopeBack, dx, cos, sin, 0, T, heads, headDim);

    /// <summary>x [T, heads, headDim] rotated in place with the tables' rows position..position+T−1.</summary>
    private void Rope(KernelSpec kernel, Tensor x, Tensor cos, Tensor sin, int position, int T, int heads, int headDim)
    {
        if (headDim % 2 != 0)
            throw new ArgumentException($"headDim {headDim} is odd.", nameof(headDim));
        long half = (long)T * (headDim / 2), table = ((long)position + T) * (headDim / 2);
        var push = new RopeParameters { TokenCount = (uint)T, Heads = (uint)heads, HeadDim = (uint)headDim, Position = (uint)position };
        RunElements(kernel, push, half * heads,
            [Single(x, (long)T * heads * headDim, nameof(x)), Single(cos, table, nameof(cos)), Single(sin, table, nameof(sin))]);
    }
}
