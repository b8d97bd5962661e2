using Microsoft.CodeAnalysis;

namespace LoraCompiler.Generator;

/// <summary>Every diagnostic the generator reports. Messages name the file and the field.</summary>
internal static class DiagnosticDescriptors
{
    private const string Category = "LoraCompiler";

    public static readonly DiagnosticDescriptor MalformedJson = Error("LORA0001", "Malformed model JSON", "{0}");
    public static readonly DiagnosticDescriptor MissingField = Error("LORA0002", "Missing model field", "{0}");
    public static readonly DiagnosticDescriptor InvalidDimension = Error("LORA0003", "Invalid model dimension", "{0}");
    public static readonly DiagnosticDescriptor HeadsMismatch = Error("LORA0004", "Attention heads do not fit the hidden size", "{0}");
    public static readonly DiagnosticDescriptor UnknownArchitecture = Error("LORA0005", "Unsupported architecture", "{0}");
    public static readonly DiagnosticDescriptor UnknownTargetModule = Error("LORA0006", "Unknown LoRA target module", "{0}");
    public static readonly DiagnosticDescriptor InvalidLora = Error("LORA0007", "Invalid LoRA setting", "{0}");
    public static readonly DiagnosticDescriptor WrongType = Error("LORA0008", "Model field has the wrong type", "{0}");
    public static readonly DiagnosticDescriptor Unsupported = Error("LORA0009", "Unsupported model feature", "{0}");
    public static readonly DiagnosticDescriptor DuplicateClassName = Error("LORA0010", "Two model files give the same trainer class", "{0}");
    public static readonly DiagnosticDescriptor InvalidMemoryBudget = Error("LORA0012", "Invalid memory budget", "{0}");
    public static readonly DiagnosticDescriptor IgnoredField = new("LORA0011", "Model field has no effect", "{0}", Category,
        DiagnosticSeverity.Warning, isEnabledByDefault: true);

    public static DiagnosticDescriptor ById(string id) => id switch
    {
        "LORA0001" => MalformedJson,
        "LORA0002" => MissingField,
        "LORA0003" => InvalidDimension,
        "LORA0004" => HeadsMismatch,
        "LORA0005" => UnknownArchitecture,
        "LORA0006" => UnknownTargetModule,
        "LORA0007" => InvalidLora,
        "LORA0008" => WrongType,
        "LORA0010" => DuplicateClassName,
        "LORA0011" => IgnoredField,
        "LORA0012" => InvalidMemoryBudget,
        _ => Unsupported,
    };

    private static DiagnosticDescriptor Error(string id, string title, string format) =>
        new(id, title, format, Category, DiagnosticSeverity.Error, isEnabledByDefault: true);
}
