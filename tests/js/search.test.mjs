// Unit tests of the web export's searches on scripted models (tests/test_web_js.py compares them
// with the decoding engine's on random ones).
import assert from "node:assert/strict";
import { test } from "node:test";

import { generate, resolveOptions } from "../../src/prefixcap/web/static/search.js";

const STOP = 3;
const VOCAB = 4;

/** A model whose next-token probabilities are `next(history)` (history: the tokens chosen so far). */
function scripted(next, inputs = 1) {
  let histories = Array.from({ length: inputs }, () => []);
  const logits = () => Float32Array.from(histories.flatMap((h) => next(h).map((p) => Math.log(p))));
  return {
    prefill: async (rowsPerInput) => {
      const out = logits();
      histories = histories.flatMap((h) => Array.from({ length: rowsPerInput }, () => h.slice()));
      return out;
    },
    step: async (tokens, parents) => {
      if (parents) histories = Array.from(parents, (p) => histories[p].slice());
      tokens.forEach((t, r) => histories[r].push(t));
      return logits();
    },
  };
}

const spec = (options) => resolveOptions({}, options, { stopTokenIds: [STOP], padTokenId: 0 });

test("greedy decoding stops each row at its stop token and pads it to the longest", async () => {
  // two inputs: the first says 1 then stops, the second says 2 three times then stops
  const scripts = [[1, STOP], [2, 2, 2, STOP]];
  let input = -1;
  const next = (h) => {
    if (h.length === 0) input = (input + 1) % 2; // the prefill asks for the inputs in order
    const want = h.length === 0 ? scripts[input][0] : scripts[h[0] === 1 ? 0 : 1][h.length];
    return Array.from({ length: VOCAB }, (_, v) => (v === (want ?? STOP) ? 0.7 : 0.1));
  };
  const rows = await generate(scripted(next, 2), 2, VOCAB, spec({ max_new_tokens: 8 }));
  assert.deepEqual(rows, [[1, STOP, 0, 0], [2, 2, 2, STOP]]);
});

test("beam search finds the likelier caption that greedy misses", async () => {
  const next = (h) => (h.length === 0 ? [0.0001, 0.6, 0.3998, 0.0001] : h[0] === 1 ? [0.34, 0.33, 0.03, 0.3] : [0.03, 0.03, 0.04, 0.9]);
  const greedy = await generate(scripted(next), 1, VOCAB, spec({ num_beams: 1, max_new_tokens: 2 }));
  const beam = await generate(scripted(next), 1, VOCAB, spec({ num_beams: 2, max_new_tokens: 2 }));
  assert.deepEqual(greedy, [[1, 0]]);
  assert.deepEqual(beam, [[2, STOP]]);
});

test("the length penalty decides between a short and a long caption", async () => {
  const next = (h) => (h.length === 0 ? [0.0001, 0.5498, 0.0001, 0.45] : [0.2, 0.1, 0.1, 0.6]);
  const run = (penalty) => generate(scripted(next), 1, VOCAB, spec({ num_beams: 2, max_new_tokens: 2, length_penalty: penalty }));
  assert.deepEqual(await run(0.0), [[STOP]]); // log .45 = -0.80 beats log .55 + log .6 = -1.11
  assert.deepEqual(await run(2.0), [[1, STOP]]); // -1.11 / 4 beats -0.80 / 1
});

test("num_return_sequences returns the best hypotheses, best first", async () => {
  const next = (h) => (h.length === 0 ? [0.05, 0.5, 0.3, 0.15] : [0.1, 0.1, 0.1, 0.7]);
  const rows = await generate(scripted(next), 1, VOCAB, spec({ num_beams: 3, num_return_sequences: 3, max_new_tokens: 3 }));
  assert.deepEqual(rows, [[1, STOP], [2, STOP], [STOP, 0]]); // log-probs / length: -0.52, -0.78, -1.90
});

test("min_new_tokens bans the stop token until enough tokens are made", async () => {
  const next = (h) => [0.1, 0.2, 0.3, 0.4];
  assert.deepEqual(await generate(scripted(next), 1, VOCAB, spec({ max_new_tokens: 5 })), [[STOP]]);
  assert.deepEqual(await generate(scripted(next), 1, VOCAB, spec({ max_new_tokens: 5, min_new_tokens: 2 })), [[2, 2, STOP]]);
});

test("no_repeat_ngram_size and repetition_penalty steer away from repeats", async () => {
  const next = (h) => (h.length < 4 ? [0.1, 0.5, 0.35, 0.05] : [0.1, 0.1, 0.1, 0.7]);
  const plain = await generate(scripted(next), 1, VOCAB, spec({ max_new_tokens: 5 }));
  const noRepeat = await generate(scripted(next), 1, VOCAB, spec({ max_new_tokens: 5, no_repeat_ngram_size: 1 }));
  const penalised = await generate(scripted(next), 1, VOCAB, spec({ max_new_tokens: 5, repetition_penalty: 2.0 }));
  assert.deepEqual(plain, [[1, 1, 1, 1, STOP]]);
  assert.deepEqual(noRepeat, [[1, 2, 0, STOP]]);
  assert.deepEqual(penalised, [[1, 2, 1, 1, STOP]]); // a seen 1 scores log .5 * 2 = -1.39 (once, however often seen) < log .35, a seen 2 scores -2.10
});

test("options resolve over the defaults and are checked as in Python", () => {
  const ids = { stopTokenIds: [5, 3, 5], padTokenId: 0 };
  const resolved = resolveOptions({ max_new_tokens: 20 }, { num_return_sequences: 3 }, ids);
  assert.equal(resolved.num_beams, 3); // several captions switch beam search on
  assert.equal(resolved.max_new_tokens, 20);
  assert.deepEqual(resolved.stop_token_ids, [3, 5]);
  assert.throws(() => resolveOptions({}, { num_return_sequences: 2, num_beams: 1 }, ids), /num_return_sequences must be <= num_beams/);
  assert.throws(() => resolveOptions({}, { max_new_tokens: 0 }, ids), /max_new_tokens must be an integer >= 1/);
  assert.throws(() => resolveOptions({ do_sample: true }, {}, ids), /sampling is not available/);
  assert.throws(() => resolveOptions({}, { beams: 2 }, ids), /unknown option beams/);
});
