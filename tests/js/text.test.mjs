// Unit tests of the web export's text decoding (tests/test_web_js.py compares it with Hugging Face
// tokenizers on real tokenizers).
import assert from "node:assert/strict";
import { test } from "node:test";

import { TokenDecoder, collapseWhitespace } from "../../src/prefixcap/web/static/text.js";

const gpt2 = (tokens, special = []) =>
  new TokenDecoder({ tokens, special_ids: special, decoder: { type: "ByteLevel" }, clean_up_tokenization_spaces: false });

test("byte-level BPE: GPT-2's alphabet maps back to bytes, then UTF-8", () => {
  // "Ġ" is the space byte, "Ċ" the newline, "Ã©" the two bytes of "é"
  const decoder = gpt2(["a", "Ġcat", "Ċ", "cafÃ©", "<|endoftext|>"], [4]);
  assert.equal(decoder.decode([0, 1, 2, 3, 4]), "a cat\ncafé");
  assert.equal(decoder.caption([0, 1, 2, 3, 4, 4]), "a cat café");
});

test("byte-level BPE: a split UTF-8 character becomes U+FFFD, a token outside the alphabet stays as written", () => {
  const decoder = gpt2(["â", "Ĥ", "¬", "€", "x y"]); // "€" is E2 82 AC: â Ĥ ¬ in the alphabet
  assert.equal(decoder.decode([0, 1, 2]), "€");
  assert.equal(decoder.decode([0, 1]), "\uFFFD");
  assert.equal(decoder.decode([3, 4]), "€x y");
});

test("SentencePiece style (Llama 2): Replace, ByteFallback, Fuse, Strip", () => {
  const decoder = new TokenDecoder({
    tokens: ["<s>", "▁Hello", "<0xE2>", "<0x82>", "<0xAC>", "▁world", "<0xFF>"],
    special_ids: [0],
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "▁" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    clean_up_tokenization_spaces: false,
  });
  assert.equal(decoder.decode([0, 1, 2, 3, 4, 5]), "Hello€ world");
  assert.equal(decoder.decode([1, 6, 6]), "Hello\uFFFD\uFFFD"); // invalid bytes: one U+FFFD each
});

test("Metaspace drops the first token's leading marker", () => {
  const decoder = new TokenDecoder({
    tokens: ["▁a", "▁photo", "."],
    special_ids: [],
    decoder: { type: "Metaspace", replacement: "▁", prepend_scheme: "always", split: true },
    clean_up_tokenization_spaces: false,
  });
  assert.equal(decoder.decode([0, 1, 2]), "a photo.");
});

test("ids without a token are skipped; no decoder joins tokens with spaces; clean-up as transformers'", () => {
  const decoder = new TokenDecoder({ tokens: ["a", "dog", null, "."], special_ids: [], decoder: null, clean_up_tokenization_spaces: true });
  assert.equal(decoder.decode([0, 1, 2, 3, 99]), "a dog.");
});

test("whitespace collapses as Python's str.split() does", () => {
  assert.equal(collapseWhitespace("  a\u001c b\u0085c\u3000 "), "a b c");
  assert.equal(collapseWhitespace("a\uFEFFb"), "a\uFEFFb"); // not whitespace in Python
});
