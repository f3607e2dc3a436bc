// Token ids to caption text, as prefixcap's CaptionModel.decode does it in Python: Hugging Face
// tokenizers' decode with special tokens skipped (id -> token string, then the tokenizer's decoder
// pipeline), transformers' optional clean-up, then whitespace collapsed.
//
// The export writes the id -> token table and the decoder pipeline (text.json); this module runs the
// pipelines of GPT-2's byte-level BPE (also Llama 3, Qwen2, SmolLM2: decoder "ByteLevel") and of
// SentencePiece-style tokenizers (Llama 2, Mistral: Replace, ByteFallback, Fuse, Strip, Metaspace).

const BYTE_TO_CHAR = byteLevelAlphabet();
const CHAR_TO_BYTE = new Map(BYTE_TO_CHAR.map((char, byte) => [char, byte]));

/** GPT-2's map of the 256 bytes to printable characters (bytes_to_unicode). */
function byteLevelAlphabet() {
  const chars = new Array(256);
  const printable = (b) => (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  let next = 256;
  for (let b = 0; b < 256; b++) chars[b] = String.fromCodePoint(printable(b) ? b : next++);
  return chars;
}

const utf8 = new TextDecoder("utf-8", { fatal: false }); // lossy: U+FFFD for invalid sequences, as Rust's
const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

// Each decoder maps a list of token strings to a list of strings (tokenizers' decode_chain).
const DECODERS = {
  ByteLevel: () => (tokens) => {
    const bytes = [];
    for (const token of tokens) {
      const chars = Array.from(token);
      if (chars.every((c) => CHAR_TO_BYTE.has(c))) for (const c of chars) bytes.push(CHAR_TO_BYTE.get(c));
      else bytes.push(...new TextEncoder().encode(token)); // a token outside the alphabet: its own bytes
    }
    return [utf8.decode(Uint8Array.from(bytes))];
  },
  ByteFallback: () => (tokens) => {
    const out = [];
    let pending = [];
    const flush = () => {
      if (!pending.length) return;
      try {
        out.push(strictUtf8.decode(Uint8Array.from(pending)));
      } catch {
        for (let i = 0; i < pending.length; i++) out.push("\uFFFD");
      }
      pending = [];
    };
    for (const token of tokens) {
      const match = /^<0x([0-9A-Fa-f]{2})>$/.exec(token);
      if (match && token.length === 6) {
        pending.push(parseInt(match[1], 16));
      } else {
        flush();
        out.push(token);
      }
    }
    flush();
    return out;
  },
  Fuse: () => (tokens) => [tokens.join("")],
  Strip: ({ content, start, stop }) => (tokens) =>
    tokens.map((token) => {
      const chars = Array.from(token);
      let from = 0;
      for (let i = 0; i < Math.min(start, chars.length) && chars[i] === content; i++) from = i + 1;
      let to = chars.length;
      for (let i = 0; i < stop && chars.length - i - 1 >= 0 && chars[chars.length - i - 1] === content; i++) {
        to = chars.length - i - 1;
      }
      return chars.slice(from, Math.max(from, to)).join("");
    }),
  Replace: ({ pattern, content }) => {
    if (pattern.String === undefined) throw new Error("Replace decoders with a regex pattern are not supported");
    return (tokens) => tokens.map((token) => token.split(pattern.String).join(content));
  },
  Metaspace: ({ replacement, prepend_scheme: prependScheme }) => (tokens) =>
    tokens.map((token, i) =>
      Array.from(token)
        .map((c) => (c === replacement ? (i === 0 && prependScheme !== "never" ? "" : " ") : c))
        .join(""),
    ),
  Sequence: ({ decoders }) => {
    const steps = decoders.map(makeDecoder);
    return (tokens) => steps.reduce((current, step) => step(current), tokens);
  },
};

/** The decoder types this module runs (the export refuses a tokenizer using others). */
export const SUPPORTED_DECODERS = Object.freeze(Object.keys(DECODERS));

function makeDecoder(spec) {
  const make = DECODERS[spec.type];
  if (!make) throw new Error(`tokenizer decoder ${spec.type} is not supported`);
  return make(spec);
}

// str.isspace() in Python (JS's \s differs: it has U+FEFF and lacks U+001C..U+001F and U+0085)
const PYTHON_WHITESPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/;

/** " ".join(text.split()) in Python. */
export function collapseWhitespace(text) {
  return text.split(PYTHON_WHITESPACE).filter(Boolean).join(" ");
}

// transformers' clean_up_tokenization
const CLEAN_UP = [
  [" .", "."], [" ?", "?"], [" !", "!"], [" ,", ","], [" ' ", "'"],
  [" n't", "n't"], [" 'm", "'m"], [" 's", "'s"], [" 've", "'ve"], [" 're", "'re"],
]; // prettier-ignore

export class TokenDecoder {
  /**
   * @param {{tokens: (string|null)[], special_ids: number[], decoder: object|null,
   *          clean_up_tokenization_spaces: boolean}} text the export's text.json
   */
  constructor(text) {
    this.tokens = text.tokens;
    this.special = new Set(text.special_ids);
    this.decoder = text.decoder ? makeDecoder(text.decoder) : null;
    this.cleanUp = Boolean(text.clean_up_tokenization_spaces);
  }

  /** The text of token ids, special tokens skipped (tokenizers' decode, then transformers' clean-up). */
  decode(ids) {
    const tokens = [];
    for (const id of ids) {
      const token = this.tokens[id];
      if (token !== null && token !== undefined && !this.special.has(id)) tokens.push(token);
    }
    let text = this.decoder ? this.decoder(tokens).join("") : tokens.join(" ");
    if (this.cleanUp) for (const [from, to] of CLEAN_UP) text = text.split(from).join(to);
    return text;
  }

  /** The caption of token ids, as CaptionModel.decode gives it: decoded, whitespace collapsed. */
  caption(ids) {
    return collapseWhitespace(this.decode(ids));
  }
}
