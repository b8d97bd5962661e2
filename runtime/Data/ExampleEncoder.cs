namespace LoraCompiler.Runtime.Data;

/// <summary>One turn of a conversation: its role (system, user or assistant) and its text.</summary>
public sealed record ChatMessage(string Role, string Content)
{
    /// <summary>The roles a conversation may use.</summary>
    public static readonly IReadOnlyList<string> Roles = ["system", "user", "assistant"];
}

/// <summary>How a conversation is written out as tokens.</summary>
public enum ChatFormat
{
    /// <summary>
    /// Qwen's ChatML: <c>&lt;|im_start|&gt;{role}\n{content}&lt;|im_end|&gt;\n</c> per message, no default
    /// system prompt.
    /// </summary>
    ChatML,

    /// <summary>
    /// Llama 3's headers: BOS, then <c>&lt;|start_header_id|&gt;{role}&lt;|end_header_id|&gt;\n\n{content}&lt;|eot_id|&gt;</c>
    /// per message, the content trimmed of surrounding whitespace as Llama 3's chat template does.
    /// </summary>
    Llama3,

    /// <summary>
    /// Gemma's turns: BOS, then <c>&lt;start_of_turn&gt;{role}\n{content}&lt;end_of_turn&gt;\n</c> per
    /// message with the role "assistant" written "model" and the content trimmed, as Gemma 3's chat
    /// template does. Gemma has no system turn: a system message, allowed only first, is put before
    /// the first user message's content followed by a blank line, and the other messages must
    /// alternate user, assistant, user, … (the template raises an error otherwise).
    /// </summary>
    Gemma,
}

/// <summary>
/// Turns one training example into tokens and targets: <c>Targets[t]</c> is the token position t must
/// predict (<c>Tokens[t + 1]</c>) where that token is in the loss, and −1 elsewhere, as
/// <c>TrainerBase.ForwardBackward(tokens, targets)</c> takes them.
/// <list type="bullet">
/// <item>text: [BOS] text EOS, everything after BOS in the loss;</item>
/// <item>prompt and completion: [BOS] prompt completion EOS, only the completion and EOS in the loss;</item>
/// <item>messages: the conversation in the tokenizer's chat format, only the assistant turns'
/// content and the token that closes each (<c>&lt;|im_end|&gt;</c>, <c>&lt;|eot_id|&gt;</c>,
/// <c>&lt;end_of_turn&gt;</c>) in the loss.</item>
/// </list>
/// BOS is put first where the tokenizer's <see cref="BpeTokenizer.AddBosToken"/> says so (and always
/// for Llama 3's and Gemma's chat formats, whose templates write it).
/// </summary>
/// <remarks>
/// Each piece (a header, a message's content, a closing marker) is tokenized on its own and the ids
/// are concatenated, so that every token belongs to one piece and the loss boundary is exact. This
/// gives the same ids as tokenizing the whole rendered string, except where a piece starts with
/// whitespace that the tokenizer would have joined to the end of the previous piece (a ChatML content
/// that starts with a newline, say); Llama 3's and Gemma's trimmed contents never do, and Gemma's
/// newlines are added tokens, which cut the text apart anyway.
/// </remarks>
public sealed class ExampleEncoder
{
    private readonly BpeTokenizer _tokenizer;
    private readonly bool _parseSpecialTokens;

    /// <param name="tokenizer">The model's tokenizer.</param>
    /// <param name="parseSpecialTokens">
    /// Whether special tokens written in the data (<c>&lt;|im_end|&gt;</c> inside a text, say) become
    /// those tokens, as Hugging Face's tokenizers do by default, or stay text.
    /// </param>
    /// <param name="chatFormat">The format of conversations; null takes it from the tokenizer's special tokens (<see cref="DetectChatFormat"/>).</param>
    public ExampleEncoder(BpeTokenizer tokenizer, bool parseSpecialTokens = true, ChatFormat? chatFormat = null)
    {
        _tokenizer = tokenizer;
        _parseSpecialTokens = parseSpecialTokens;
        ChatFormat = chatFormat ?? DetectChatFormat(tokenizer);
    }

    /// <summary>The chat format conversations are written in, or null where the tokenizer has the special tokens of none.</summary>
    public ChatFormat? ChatFormat { get; }

    /// <summary>
    /// ChatML where the tokenizer has &lt;|im_start|&gt; and &lt;|im_end|&gt;, Llama 3 where it has its
    /// header tokens and &lt;|eot_id|&gt;, Gemma where it has &lt;start_of_turn&gt; and &lt;end_of_turn&gt;,
    /// otherwise null.
    /// </summary>
    public static ChatFormat? DetectChatFormat(BpeTokenizer tokenizer)
    {
        if (tokenizer.TokenId("<|im_start|>") is not null && tokenizer.TokenId("<|im_end|>") is not null)
            return Data.ChatFormat.ChatML;
        if (tokenizer.TokenId("<|start_header_id|>") is not null && tokenizer.TokenId("<|end_header_id|>") is not null
            && tokenizer.TokenId("<|eot_id|>") is not null)
            return Data.ChatFormat.Llama3;
        if (tokenizer.TokenId("<start_of_turn>") is not null && tokenizer.TokenId("<end_of_turn>") is not null)
            return Data.ChatFormat.Gemma;
        return null;
    }

    /// <summary>A plain text: [BOS] text EOS, all of it in the loss.</summary>
    public (int[] Tokens, int[] Targets) Text(string text)
    {
        var example = Start();
        example.Add(Encode(text), loss: true);
        example.Add(Eos(), loss: true);
        return example.Build();
    }

    /// <summary>A prompt and its completion: [BOS] prompt completion EOS, only the completion and EOS in the loss.</summary>
    public (int[] Tokens, int[] Targets) PromptCompletion(string prompt, string completion)
    {
        var example = Start();
        example.Add(Encode(prompt), loss: false);
        example.Add(Encode(completion), loss: true);
        example.Add(Eos(), loss: true);
        return example.Build();
    }

    /// <summary>
    /// A conversation in <see cref="ChatFormat"/>, only the assistant turns (content and closing token)
    /// in the loss. An unknown role, or in Gemma's format a conversation its template refuses, throws
    /// an <see cref="ArgumentException"/>.
    /// </summary>
    public (int[] Tokens, int[] Targets) Messages(IReadOnlyList<ChatMessage> messages)
    {
        foreach (var message in messages)
            if (!ChatMessage.Roles.Contains(message.Role))
                throw new ArgumentException($"Unknown role '{message.Role}'; expected system, user or assistant.", nameof(messages));
        return ChatFormat switch
        {
            Data.ChatFormat.ChatML => ChatML(messages),
            Data.ChatFormat.Llama3 => Llama3(messages),
            Data.ChatFormat.Gemma => Gemma(messages),
            _ => throw new InvalidOperationException(
                $"The tokenizer {_tokenizer.Source} has neither ChatML's <|im_start|>/<|im_end|>, Llama 3's header tokens nor Gemma's <start_of_turn>/<end_of_turn>, so conversations cannot be written out."),
        };
    }

    /// <summary>
    /// A prompt to generate from: the conversation in <see cref="ChatFormat"/> followed by the header of
    /// the assistant's turn (Hugging Face's <c>add_generation_prompt</c>), so the model writes the reply.
    /// </summary>
    public int[] ChatPrompt(IReadOnlyList<ChatMessage> messages)
    {
        var prompt = new List<int>(Messages(messages).Tokens);
        switch (ChatFormat)
        {
            case Data.ChatFormat.ChatML:
                prompt.Add(Special("<|im_start|>"));
                prompt.AddRange(_tokenizer.Encode("assistant\n", allowSpecialTokens: false));
                break;
            case Data.ChatFormat.Llama3:
                prompt.Add(Special("<|start_header_id|>"));
                prompt.AddRange(_tokenizer.Encode("assistant", allowSpecialTokens: false));
                prompt.Add(Special("<|end_header_id|>"));
                prompt.AddRange(_tokenizer.Encode("\n\n", allowSpecialTokens: false));
                break;
            case Data.ChatFormat.Gemma:
                prompt.Add(Special("<start_of_turn>"));
                prompt.AddRange(_tokenizer.Encode("model\n", allowSpecialTokens: false));
                break;
        }
        return prompt.ToArray();
    }

    /// <summary>A plain text prompt to continue: [BOS] text, no EOS.</summary>
    public int[] TextPrompt(string text)
    {
        var example = Start();
        example.Add(Encode(text), loss: false);
        return example.Build().Tokens;
    }

    /// <summary>The tokens that end the assistant's turn in <see cref="ChatFormat"/> (where generation of a reply stops).</summary>
    public IEnumerable<int> TurnEnd() => ChatFormat switch
    {
        Data.ChatFormat.ChatML => [Special("<|im_end|>")],
        Data.ChatFormat.Llama3 => [Special("<|eot_id|>")],
        Data.ChatFormat.Gemma => [Special("<end_of_turn>")],
        _ => [],
    };

    private (int[] Tokens, int[] Targets) ChatML(IReadOnlyList<ChatMessage> messages)
    {
        int start = Special("<|im_start|>");
        int end = Special("<|im_end|>");
        int[] newline = _tokenizer.Encode("\n", allowSpecialTokens: false);
        var example = Start();
        foreach (var message in messages)
        {
            bool loss = message.Role == "assistant";
            example.Add(start, loss: false);
            example.Add(_tokenizer.Encode(message.Role + "\n", allowSpecialTokens: false), loss: false);
            example.Add(Encode(message.Content), loss);
            example.Add(end, loss);
            example.Add(newline, loss: false);
        }
        return example.Build();
    }

    private (int[] Tokens, int[] Targets) Llama3(IReadOnlyList<ChatMessage> messages)
    {
        int startHeader = Special("<|start_header_id|>");
        int endHeader = Special("<|end_header_id|>");
        int end = Special("<|eot_id|>");
        int[] blankLine = _tokenizer.Encode("\n\n", allowSpecialTokens: false);
        var example = new ExampleBuilder();
        if (_tokenizer.BosId is int bos)
            example.Add(bos, loss: false);
        foreach (var message in messages)
        {
            bool loss = message.Role == "assistant";
            example.Add(startHeader, loss: false);
            example.Add(_tokenizer.Encode(message.Role, allowSpecialTokens: false), loss: false);
            example.Add(endHeader, loss: false);
            example.Add(blankLine, loss: false);
            example.Add(Encode(message.Content.Trim()), loss);
            example.Add(end, loss);
        }
        return example.Build();
    }

    private (int[] Tokens, int[] Targets) Gemma(IReadOnlyList<ChatMessage> messages)
    {
        int start = Special("<start_of_turn>");
        int end = Special("<end_of_turn>");
        int[] newline = _tokenizer.Encode("\n", allowSpecialTokens: false);
        var example = new ExampleBuilder();
        if (_tokenizer.BosId is int bos)
            example.Add(bos, loss: false);

        // The template: a leading system message becomes a prefix of the first user turn (not trimmed,
        // then a blank line); the turns after it must go user, assistant, user, ...
        string firstUserPrefix = "";
        int first = 0;
        if (messages.Count > 0 && messages[0].Role == "system")
        {
            if (messages.Count == 1 || messages[1].Role != "user")
                throw new ArgumentException("Gemma's chat format has no system turn: a system message must be followed by a user message, into which it is folded.");
            firstUserPrefix = messages[0].Content + "\n\n";
            first = 1;
        }
        for (int i = first; i < messages.Count; i++)
        {
            var message = messages[i];
            string expected = (i - first) % 2 == 0 ? "user" : "assistant";
            if (message.Role != expected)
                throw new ArgumentException(
                    $"Gemma's chat format needs roles that alternate user/assistant/user/assistant/... (after an optional first system message); message {i} is {message.Role}, where {expected} was expected.");
            bool loss = message.Role == "assistant";
            example.Add(start, loss: false);
            example.Add(_tokenizer.Encode((loss ? "model" : "user") + "\n", allowSpecialTokens: false), loss: false);
            if (i == first && firstUserPrefix.Length > 0)
                example.Add(Encode(firstUserPrefix), loss: false);
            example.Add(Encode(message.Content.Trim()), loss);
            example.Add(end, loss);
            example.Add(newline, loss: false);
        }
        return example.Build();
    }

    private ExampleBuilder Start()
    {
        var example = new ExampleBuilder();
        if (_tokenizer.AddBosToken && _tokenizer.BosId is int bos)
            example.Add(bos, loss: false);
        return example;
    }

    private int[] Encode(string text) => _tokenizer.Encode(text, _parseSpecialTokens);

    private int Eos() => _tokenizer.EosId ?? throw new InvalidOperationException(
        $"The tokenizer {_tokenizer.Source} has no eos_token (it comes from tokenizer_config.json beside it), so a text or completion cannot be ended.");

    private int Special(string token) => _tokenizer.TokenId(token)
        ?? throw new InvalidOperationException($"The tokenizer {_tokenizer.Source} has no {token} token.");

    /// <summary>Tokens with a flag each for whether predicting it is in the loss.</summary>
    private sealed class ExampleBuilder
    {
        private readonly List<int> _tokens = [];
        private readonly List<bool> _loss = [];

        public void Add(int id, bool loss)
        {
            _tokens.Add(id);
            _loss.Add(loss);
        }

        public void Add(IEnumerable<int> ids, bool loss)
        {
            foreach (int id in ids)
                Add(id, loss);
        }

        public (int[] Tokens, int[] Targets) Build()
        {
            int[] tokens = _tokens.ToArray();
            var targets = new int[tokens.Length];
            for (int t = 0; t < tokens.Length; t++)
                targets[t] = t + 1 < tokens.Length && _loss[t + 1] ? tokens[t + 1] : -1;
            return (tokens, targets);
        }
    }
}
