using System.Runtime.CompilerServices;

namespace LoraCompiler.Tests.Generator.Snapshots;

/// <summary>
/// Snapshot testing in Verify's workflow (Verify itself is not served by this registry): the accepted
/// text lives in <c>Snapshots/&lt;name&gt;.verified.cs</c> beside the test file; a mismatch writes
/// <c>&lt;name&gt;.received.cs</c> next to it and fails. Accept a change by copying the received file
/// over the verified one after reading the diff. A missing verified file always fails, so a snapshot
/// is never accepted without a person looking at it.
/// </summary>
/// <remarks>
/// The files are found through the test's <see cref="CallerFilePathAttribute"/>, so the tests must run
/// from the source checkout they were built from. The test project keeps <c>*.verified.cs</c> and
/// <c>*.received.cs</c> out of its compilation.
/// </remarks>
public static class Snapshot
{
    public static void Match(string actual, string name, [CallerFilePath] string testFile = "")
    {
        string directory = Path.Combine(Path.GetDirectoryName(testFile) ?? "", "Snapshots");
        if (!Directory.Exists(directory))
            Assert.Fail($"Snapshot '{name}': the folder {directory} (from the test's source path) does not exist. " +
                        "Snapshot tests read their files from the source checkout; run them from it.");

        string verifiedPath = Path.Combine(directory, name + ".verified.cs");
        string receivedPath = Path.Combine(directory, name + ".received.cs");
        string received = Normalize(actual);

        if (!File.Exists(verifiedPath))
        {
            File.WriteAllText(receivedPath, received);
            string ci = IsCi
                ? " Snapshots are never created in CI (CI=true): accept it locally and commit the verified file."
                : "";
            Assert.Fail($"Snapshot '{name}' has no verified file yet.{ci}\n" +
                        $"Wrote {receivedPath}.\n" +
                        $"Read it; if it is right, accept it with:\n    {AcceptCommand(receivedPath, verifiedPath)}");
        }

        string verified = Normalize(File.ReadAllText(verifiedPath));
        if (verified == received)
        {
            if (File.Exists(receivedPath))
                File.Delete(receivedPath);
            return;
        }

        File.WriteAllText(receivedPath, received);
        Assert.Fail($"Snapshot '{name}' does not match {verifiedPath}.\n" +
                    FirstDifference(verified, received) + "\n" +
                    $"Wrote {receivedPath}.\n" +
                    $"If the change is intended, accept it with:\n    {AcceptCommand(receivedPath, verifiedPath)}");
    }

    private static bool IsCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    private static string Normalize(string text) => text.Replace("\r\n", "\n").Replace('\r', '\n');

    private static string AcceptCommand(string received, string verified) => $"mv \"{received}\" \"{verified}\"";

    /// <summary>The first line (1-based) where the texts differ, with both versions of it.</summary>
    internal static string FirstDifference(string verified, string received)
    {
        string[] expected = verified.Split('\n');
        string[] actual = received.Split('\n');
        int common = Math.Min(expected.Length, actual.Length);
        for (int i = 0; i < common; i++)
        {
            if (expected[i] != actual[i])
                return $"First difference at line {i + 1}:\n  verified: {expected[i]}\n  received: {actual[i]}";
        }
        return expected.Length < actual.Length
            ? $"The received text is longer: line {common + 1} is new:\n  received: {actual[common]}"
            : $"The received text is shorter: it ends before line {common + 1}:\n  verified: {expected[common]}";
    }
}
