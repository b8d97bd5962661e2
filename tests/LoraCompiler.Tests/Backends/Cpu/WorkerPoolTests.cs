using LoraCompiler.Runtime.Backends;

namespace LoraCompiler.Tests.Backends.Cpu;

public class WorkerPoolTests
{
    private struct SlowBody : IParallelBody
    {
        public int[] Done;
        public int SleepMs;

        public readonly void Run(int index)
        {
            Thread.Sleep(SleepMs);
            Interlocked.Increment(ref Done[index]);
        }
    }

    [Fact]
    public void Every_index_runs_once()
    {
        var done = new int[1000];
        WorkerPool.For(done.Length, 4, new SlowBody { Done = done, SleepMs = 0 });
        Assert.All(done, d => Assert.Equal(1, d));
    }

    [Fact]
    public void A_caller_that_waits_for_its_workers_allocates_nothing()
    {
        if (Environment.ProcessorCount < 2)
            return; // one core: the loop runs on the caller alone and nothing waits
        var done = new int[8];
        var body = new SlowBody { Done = done, SleepMs = 0 };
        WorkerPool.For(done.Length, 2, body); // the JIT's first call and the workers' start

        // Each index sleeps, so the caller finishes its share while a worker still sleeps and blocks on it.
        body.SleepMs = 30;
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 3; i++)
            WorkerPool.For(done.Length, 2, body);
        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
        Assert.All(done, d => Assert.Equal(4, d));
    }
}
