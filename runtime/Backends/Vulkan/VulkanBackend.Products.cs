using System.Runtime.InteropServices;
using VkBuffer = Silk.NET.Vulkan.Buffer;

namespace LoraCompiler.Runtime.Backends.Vulkan;

/// <summary>The matrix products: linear layers, MatMul (the LoRA products), the LM head with its cross-entropy, and the row ranges of split weights.</summary>
public sealed unsafe partial class VulkanBackend
{
    // ---------------------------------------------------------------- linear and LoRA

    public void LinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, int T, int din, int dout)
    {
        VkBuffer yb = Single(y, (long)T * dout, nameof(y)), xb = Single(x, (long)T * din, nameof(x));
        var (bb, biasFormat) = bias is null ? (_dummy.Handle, 0u) : StoredVector(bias, dout, nameof(bias));
        foreach (var s in RowSegments(Weight(w, dout, din, nameof(w)), 0, dout, din))
            // y[:, rows of the segment] = x · segmentᵀ (+ bias of those rows)
            WeightGemm(transposed: true, yb, xb, s, bb, new GemmParameters
            {
                Rows = (uint)T, Cols = (uint)s.Rows, Depth = (uint)din,
                StrideA = (uint)din, StrideB = (uint)din, StrideC = (uint)dout,
                OffsetC = (uint)s.FirstRow, OffsetBias = (uint)s.FirstRow,
                Alpha = 1f, HasBias = bias is null ? 0u : 1u, BiasFormat = biasFormat,
            });
    }

    public void LinearBackwardInput(Tensor dx, Tensor dy, Tensor w, int T, int din, int dout, bool accumulate)
    {
        VkBuffer dxb = Single(dx, (long)T * din, nameof(dx)), dyb = Single(dy, (long)T * dout, nameof(dy));
        bool first = true;
        foreach (var s in RowSegments(Weight(w, dout, din, nameof(w)), 0, dout, din))
        {
            // dx (=|+=) dy[:, rows of the segment] · segment
            WeightGemm(transposed: false, dxb, dyb, s, _dummy.Handle, new GemmParameters
            {
                Rows = (uint)T, Depth = (uint)s.Rows, Cols = (uint)din,
                StrideA = (uint)dout, StrideB = (uint)din, StrideC = (uint)din,
                OffsetA = (uint)s.FirstRow,
                Alpha = 1f, Accumulate = accumulate || !first ? 1u : 0u,
            });
            first = false;
        }
    }

    public void MatMul(Tensor c, Tensor a, Tensor b, int rows, int cols, int depth, MatMulForm form, float alpha, bool accumulate)
    {
        VkBuffer cb = Single(c, (long)rows * cols, nameof(c)), ab = Single(a, (long)rows * depth, nameof(a));
        VkBuffer bb = Single(b, (long)cols * depth, nameof(b));
        var (kernel, strideA, strideB) = form switch
        {
            MatMulForm.NT => (Kernels.GemmNT, depth, depth),
            MatMulForm.NN => (Kernels.GemmNN, depth, cols),
            MatMulForm.TN => (Kernels.GemmTN, rows, cols),
            _ => throw new ArgumentOutOfRangeException(nameof(form), form, null),
        };
        Gemm(kernel, cb, ab, bb, _dummy.Handle, Product(rows, cols, depth, strideA, strideB, cols, alpha, accumulate));
    }

    private static GemmParameters Product(int rows, int cols, int depth, int strideA, int strideB, int strideC, float alpha, bool accumulate) => new()
    {
        Rows = (uint)rows, Cols = (uint)cols, Depth = (uint)depth,
        StrideA = (uint)strideA, StrideB = (uint)strideB, StrideC = (uint)strideC,
        Alpha = alpha, Accumulate = accumulate ? 1u : 0u,
    };

    // ---------------------------------------------------------------- LM head + cross-entropy

    public float LmHeadCrossEntropy(Tensor dx, Tensor logits, Tensor x, Tensor w, ReadOnlySpan<int> targets, int T, int C, int V, int chunk,
                                    float softcap)
    {
        if (!(softcap >= 0) || float.IsPositiveInfinity(softcap))
            throw new ArgumentOutOfRangeException(nameof(softcap), softcap, "softcap must be 0 (none) or a positive cap.");
        if (chunk <= 0)
            throw new ArgumentOutOfRangeException(nameof(chunk), chunk, "chunk must be positive.");
        chunk = Math.Min(chunk, V);
        var dxt = Vulkan(dx, (long)T * C, nameof(dx));
        VkBuffer dxb = Single(dxt, (long)T * C), lb = Single(logits, (long)T * chunk, nameof(logits)), xb = Single(x, (long)T * C, nameof(x));
        var wt = Weight(w, V, C, nameof(w));
        int count = SequenceChecks.Labels(targets, T, V);
        Zero(dxt, (long)T * C);
        if (count == 0)
            return 0f;

        var labels = UploadInts(ref _targets, targets[..T], "labels");
        EnsureBuffer(ref _stats, (ulong)(3 * T) * sizeof(float), "cross-entropy row statistics");
        var stats = _stats!.Handle;
        float inverse = 1f / count;

        // Pass 1: logits chunk by chunk (softcapped in the shader when softcap > 0), an online log-sum-exp per row.
        for (int v0 = 0; v0 < V; v0 += chunk)
        {
            int n = Math.Min(chunk, V - v0);
            Logits(lb, xb, wt, v0, n, T, C);
            var push = new CrossEntropyParameters
            {
                TokenCount = (uint)T, ChunkWidth = (uint)n, ChunkFirst = (uint)v0, FirstChunk = v0 == 0 ? 1u : 0u, InverseCount = inverse, Softcap = softcap,
            };
            RunRows(Kernels.CrossEntropy, push, T, [stats, lb, labels]);
        }
        // Pass 2: recompute each chunk, turn it into dlogits (through the cap's derivative), dx += dlogits·w_chunk.
        for (int v0 = 0; v0 < V; v0 += chunk)
        {
            int n = Math.Min(chunk, V - v0);
            Logits(lb, xb, wt, v0, n, T, C);
            var push = new CrossEntropyParameters { TokenCount = (uint)T, ChunkWidth = (uint)n, ChunkFirst = (uint)v0, InverseCount = inverse, Softcap = softcap };
            RunElements(Kernels.CrossEntropyBack, push, (long)T * n, [lb, stats, labels]);
            foreach (var s in RowSegments(wt, v0, n, C))
                WeightGemm(transposed: false, dxb, lb, s, _dummy.Handle, new GemmParameters
                {
                    Rows = (uint)T, Depth = (uint)s.Rows, Cols = (uint)C,
                    StrideA = (uint)n, StrideB = (uint)C, StrideC = (uint)C,
                    OffsetA = (uint)(s.FirstRow - v0),
                    Alpha = 1f, Accumulate = 1,
                });
        }

        // The loss: the mean of lse − the target's capped logit over labelled rows, reduced on the
        // device from the statistics; one float comes back (waits for the device).
        EnsureBuffer(ref _loss, 16, "the loss");
        RunRows(Kernels.CrossEntropyLoss, new LossParameters { TokenCount = (uint)T, InverseCount = inverse }, 1, [_loss!.Handle, stats, labels]);
        Span<float> loss = stackalloc float[1];
        ReadBack(_loss.Handle, 0, MemoryMarshal.AsBytes(loss));
        return loss[0];
    }

    /// <summary>logits[T, n] = x·w[v0..v0+n)ᵀ, one product per part of w the rows fall in.</summary>
    private void Logits(VkBuffer logits, VkBuffer x, Tensor w, int v0, int n, int T, int C)
    {
        foreach (var s in RowSegments(w, v0, n, C))
            WeightGemm(transposed: true, logits, x, s, _dummy.Handle, new GemmParameters
            {
                Rows = (uint)T, Cols = (uint)s.Rows, Depth = (uint)C,
                StrideA = (uint)C, StrideB = (uint)C, StrideC = (uint)n,
                OffsetC = (uint)(s.FirstRow - v0),
                Alpha = 1f,
            });
    }

    /// <summary>
    /// Decoding's logits [T, V] = x·wᵀ through the LM head's products (one per part of w that its rows fall
    /// in, 4-bit or float), then c·tanh(logits / c) in place (softcap.comp) when softcap c &gt; 0.
    /// </summary>
    public void LmHeadLogits(Tensor logits, Tensor x, Tensor w, int T, int C, int V, float softcap)
    {
        if (!(softcap >= 0) || float.IsPositiveInfinity(softcap))
            throw new ArgumentOutOfRangeException(nameof(softcap), softcap, "softcap must be 0 (none) or a positive cap.");
        long n = (long)T * V;
        var lt = Vulkan(logits, n, nameof(logits));
        VkBuffer lb = Single(lt, n), xb = Single(x, (long)T * C, nameof(x));
        Logits(lb, xb, Weight(w, V, C, nameof(w)), 0, V, T, C);
        if (softcap > 0)
            Elementwise(Kernels.Softcap, n, [lt], (count, _) => new SoftcapParameters { Count = count, Cap = softcap });
    }

    // ---------------------------------------------------------------- row ranges of split weights

    /// <summary>
    /// Rows [first, first+Rows) of a weight, as they lie in one buffer: of a float or 16-bit weight
    /// (<paramref name="W16"/> not null) from element Offset; of a 4-bit weight (<paramref name="Q4"/>
    /// not null) from row Offset of its part, whose packed words are Buffer and scale/bias pairs ScaleBias.
    /// </summary>
    private readonly record struct RowSegment(VkBuffer Buffer, uint Offset, long FirstRow, int Rows, VulkanQ4Tensor? Q4 = null, VkBuffer ScaleBias = default,
                                              VulkanFloat16Tensor? W16 = null);

    /// <summary>Rows [first, first + count) of a float or 4-bit weight whose rows are <paramref name="width"/> long.</summary>
    private List<RowSegment> RowSegments(Tensor w, long first, long count, int width) => w switch
    {
        VulkanQ4Tensor q => q.Segments(first, count)
            .Select(s => new RowSegment(s.Part.Packed.Handle, (uint)s.Offset, s.FirstRow, s.Rows, q, s.Part.ScaleBias.Handle)).ToList(),
        VulkanFloat16Tensor h => h.Segments(first, count)
            .Select(s => new RowSegment(s.Part.Buffer.Handle, checked((uint)((long)s.Offset * h.Columns)), s.FirstRow, s.Rows, W16: h)).ToList(),
        VulkanTensor t => RowSegments(t, first, count, width),
        _ => throw new ArgumentException($"{w} is a {w.GetType().Name}, not a Vulkan tensor.", nameof(w)),
    };

    /// <summary>
    /// The product of <paramref name="a"/> with a segment of a weight: c = a·segmentᵀ (gemm_nt) when
    /// <paramref name="transposed"/>, else c = a·segment (gemm_nn); for a 4-bit weight the q4 shaders,
    /// which dequantize its tiles as they load them. <paramref name="p"/> has everything but the
    /// weight's offset (and, for a 4-bit one, its stride in packed words), set here.
    /// </summary>
    private void WeightGemm(bool transposed, VkBuffer c, VkBuffer a, RowSegment s, VkBuffer bias, GemmParameters p)
    {
        p.OffsetB = s.Offset;
        if (s.W16 is { } h)
        {
            Gemm(transposed ? Kernels.GemmNTW16 : Kernels.GemmNNW16, [c, a, s.Buffer, bias], p, bFormat: h.ShaderFormat);
            return;
        }
        if (s.Q4 is not { } q)
        {
            Gemm(transposed ? Kernels.GemmNT : Kernels.GemmNN, [c, a, s.Buffer, bias], p);
            return;
        }
        p.StrideB = (uint)q.WordsPerRow;
        Gemm(transposed ? Kernels.GemmNTQ4 : Kernels.GemmNNQ4, [c, a, s.Buffer, s.ScaleBias, bias], p, (uint)q.GroupSize);
    }

    /// <summary>
    /// Rows [first, first + count) of w, whose rows are <paramref name="width"/> long, as runs that each
    /// lie in one part. A row that straddles two parts is copied (in order with the other commands) into
    /// a buffer of its own, kept with the tensor.
    /// </summary>
    private List<RowSegment> RowSegments(VulkanTensor w, long first, long count, int width)
    {
        var segments = new List<RowSegment>();
        long P = w.PartLength, row = first, end = first + count;
        while (row < end)
        {
            long start = row * width;
            int k = (int)(start / P);
            long whole = Math.Min(end, (k + 1) * P / width); // rows that end inside part k
            if (whole > row)
            {
                segments.Add(new RowSegment(w.Part(k), (uint)(start - k * P), row, (int)(whole - row)));
                row = whole;
                continue;
            }
            var seam = w.Seam(row, width, () => DeviceBuffer((ulong)width * sizeof(float), $"{w.Name} row {row}"));
            for (long e = start; e < start + width;)
            {
                int part = (int)(e / P);
                long stop = Math.Min(start + width, (part + 1) * P);
                _stream.CopyBuffer(w.Part(part), (ulong)(e - part * P) * sizeof(float), seam.Handle, (ulong)(e - start) * sizeof(float), (ulong)(stop - e) * sizeof(float));
                e = stop;
            }
            segments.Add(new RowSegment(seam.Handle, 0, row, 1));
            row++;
        }
        return segments;
    }
}
