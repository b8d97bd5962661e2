using System;
using System.Collections.Generic;
using System.Linq;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Text;

namespace LoraCompiler.Generator;

/// <summary>
/// Turns every <c>*.json</c> AdditionalFile (a Hugging Face config.json with optional <c>lora</c> and
/// <c>trainer</c> sections) into a trainer class, and all of them into <c>TrainerCatalog</c>.
/// Pipeline: parse (JSON → <see cref="ModelSpec"/>), plan (→ <see cref="TrainerPlan"/>), emit.
/// </summary>
[Generator(LanguageNames.CSharp)]
public sealed partial class LoraGenerator : IIncrementalGenerator
{
    public void Initialize(IncrementalGeneratorInitializationContext context)
    {
        var specs = context.AdditionalTextsProvider
            .Where(static file => file.Path.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
            .Select(static (file, cancellationToken) =>
            {
                var text = file.GetText(cancellationToken);
                return text is null
                    ? Result<ModelSpec>.Fail(new DiagnosticInfo("LORA0001", file.Path, 0, 0,
                        $"{System.IO.Path.GetFileName(file.Path)}: the file could not be read"))
                    : Parse(file.Path, text.ToString());
            });

        context.RegisterSourceOutput(specs, static (spc, result) =>
        {
            foreach (var error in result.Errors)
                spc.ReportDiagnostic(ToDiagnostic(error));
            foreach (var warning in result.Value?.Warnings ?? EquatableArray<DiagnosticInfo>.Empty)
                spc.ReportDiagnostic(ToDiagnostic(warning));
        });

        var plans = specs
            .Where(static result => result.Value is not null)
            .Select(static (result, _) => Plan(result.Value!));

        // Two files that give the same class name (tiny-qwen2.json and tiny_qwen2.json, or one name in
        // two folders) would add one hint name twice, which throws and drops every trainer: report them.
        var clashes = plans
            .Select(static (plan, _) => new ClassClaim(plan.Spec.ClassName, plan.Spec.FilePath))
            .Collect()
            .Select(static (claims, _) => Clashes(claims));

        context.RegisterSourceOutput(plans.Combine(clashes), static (spc, pair) =>
        {
            var (plan, clashing) = pair;
            if (ClashFor(plan.Spec, clashing) is { } clash)
                spc.ReportDiagnostic(ToDiagnostic(clash));
            else
                spc.AddSource($"{plan.Spec.ClassName}.g.cs", EmitTrainer(plan));
        });

        context.RegisterSourceOutput(plans.Collect().Combine(clashes), static (spc, pair) =>
            spc.AddSource("TrainerCatalog.g.cs",
                EmitCatalog(pair.Left.Select(p => p.Spec).Where(s => ClashFor(s, pair.Right) is null))));
    }

    /// <summary>Every claim on a class name that more than one model file claims, in ordinal order.</summary>
    private static EquatableArray<ClassClaim> Clashes(IEnumerable<ClassClaim> claims) =>
        claims.GroupBy(c => c.ClassName, StringComparer.Ordinal)
            .Where(g => g.Count() > 1)
            .SelectMany(g => g)
            .OrderBy(c => c.ClassName, StringComparer.Ordinal)
            .ThenBy(c => c.FilePath, StringComparer.Ordinal)
            .ToEquatableArray();

    /// <summary>The LORA0010 error for a spec whose class name another file also claims, or null.</summary>
    private static DiagnosticInfo? ClashFor(ModelSpec spec, EquatableArray<ClassClaim> clashes)
    {
        if (!clashes.Any(c => c.ClassName == spec.ClassName))
            return null;
        var others = clashes
            .Where(c => c.ClassName == spec.ClassName && c.FilePath != spec.FilePath)
            .Select(c => c.FilePath)
            .ToList();
        string from = others.Count == 0 ? "the same file listed twice" : string.Join(", ", others);
        return new DiagnosticInfo("LORA0010", spec.FilePath, 0, 0,
            $"{System.IO.Path.GetFileName(spec.FilePath)}: its trainer class '{spec.ClassName}' is also generated from {from}; " +
            "rename one of the files");
    }

    private static Diagnostic ToDiagnostic(DiagnosticInfo info)
    {
        var position = new LinePosition(info.Line, info.Column);
        var location = Location.Create(info.FilePath, default, new LinePositionSpan(position, position));
        return Diagnostic.Create(DiagnosticDescriptors.ById(info.Id), location, info.Message);
    }
}
