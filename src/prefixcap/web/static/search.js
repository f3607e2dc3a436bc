// Greedy decoding and beam search with the semantics of prefixcap's decoding engine
// (prefixcap/engine/search.py, processors.py, runner.py), token for token on equal logits.
//
// Scores are float32 tensors there: every score operation here rounds to float32 (Math.fround).
// Differences that remain: log_softmax and pow() may differ from PyTorch's and C's in the last bit,
// which can only reorder candidates whose scores tie to within one float32 ulp.

const f32 = Math.fround;

/** The options the engine takes, with the model's defaults (snake_case, as GenerationOptions). */
export const DEFAULT_OPTIONS = Object.freeze({
  max_new_tokens: 30,
  min_new_tokens: 0,
  num_beams: 1,
  length_penalty: 1.0,
  early_stopping: true,
  repetition_penalty: 1.0,
  no_repeat_ngram_size: 0,
  num_return_sequences: 1,
});

/**
 * Requested options over the model's defaults, checked as GenerationOptions.resolve and validate
 * check them (several captions without a num_beams request switch beam search on).
 * @returns {object} a decode spec: the options plus stop_token_ids and pad_token_id
 */
export function resolveOptions(defaults, requested, { stopTokenIds, padTokenId }) {
  const options = { ...DEFAULT_OPTIONS };
  for (const [name, value] of Object.entries({ ...defaults, ...requested })) {
    if (value === undefined || value === null) continue;
    if (name === "do_sample") {
      if (value) throw new RangeError("sampling is not available in the browser: use greedy or beam search");
      continue;
    }
    if (["temperature", "top_k", "top_p", "seed"].includes(name)) continue; // sampling only
    if (!Object.hasOwn(DEFAULT_OPTIONS, name)) throw new RangeError(`unknown option ${name}`);
    options[name] = value;
  }
  const n = options.num_return_sequences;
  if (n > 1 && requested.num_beams === undefined) options.num_beams = Math.max(options.num_beams, n);
  const integer = (name, min) => {
    if (!Number.isInteger(options[name]) || options[name] < min) throw new RangeError(`${name} must be an integer >= ${min}`);
  };
  integer("max_new_tokens", 1);
  integer("min_new_tokens", 0);
  integer("num_beams", 1);
  integer("no_repeat_ngram_size", 0);
  integer("num_return_sequences", 1);
  if (options.min_new_tokens > options.max_new_tokens) throw new RangeError("min_new_tokens must be in [0, max_new_tokens]");
  if (!(Number.isFinite(options.length_penalty))) throw new RangeError("length_penalty must be a finite number");
  if (!(options.repetition_penalty > 0 && Number.isFinite(options.repetition_penalty))) {
    throw new RangeError("repetition_penalty must be > 0");
  }
  if (typeof options.early_stopping !== "boolean") throw new RangeError("early_stopping must be true or false");
  if (n > options.num_beams) {
    throw new RangeError("num_return_sequences must be <= num_beams without sampling (greedy gives one caption)");
  }
  if (!stopTokenIds.length) throw new RangeError("at least one stop token id (EOS) is needed");
  return { ...options, stop_token_ids: [...new Set(stopTokenIds)].sort((a, b) => a - b), pad_token_id: padTokenId };
}

/** Whether any logits rule applies (else greedy takes the argmax of the raw logits). */
function processesLogits(spec) {
  return spec.repetition_penalty !== 1.0 || spec.no_repeat_ngram_size > 0 || spec.min_new_tokens > 0;
}

/**
 * The engine's logits rules on one row's float32 scores, in place: repetition penalty, banned
 * repeated n-grams, stop tokens banned before min_new_tokens. `history` holds the row's tokens so far.
 */
export function processLogits(scores, history, step, spec) {
  if (spec.repetition_penalty !== 1.0 && step > 0) {
    const penalty = f32(spec.repetition_penalty);
    const seen = new Map(); // PyTorch gathers every position first, then scatters: each token once
    for (const token of history) if (!seen.has(token)) seen.set(token, scores[token]);
    for (const [token, value] of seen) scores[token] = value < 0 ? f32(value * penalty) : f32(value / penalty);
  }
  const n = spec.no_repeat_ngram_size;
  if (n > 0 && step >= n) {
    for (let start = 0; start + n <= step; start++) {
      let matches = true;
      for (let i = 0; i < n - 1 && matches; i++) matches = history[start + i] === history[step - n + 1 + i];
      if (matches) scores[history[start + n - 1]] = -Infinity;
    }
  }
  if (step < spec.min_new_tokens) for (const stop of spec.stop_token_ids) scores[stop] = -Infinity;
  return scores;
}

/** log_softmax of float32 logits as PyTorch computes it on a CPU: (x - max) - log(sum(exp(x - max))), in float32. */
export function logSoftmax(logits) {
  let max = -Infinity;
  for (const value of logits) if (value > max) max = value;
  let sum = 0;
  for (const value of logits) sum += Math.exp(f32(value - max));
  const logSum = f32(Math.log(f32(sum)));
  const out = new Float32Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = f32(logits[i] - max) - logSum;
  return out;
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

/** Indices of the k largest values, largest first (ties: lower index first). */
function topK(values, k) {
  const picked = [];
  for (let i = 0; i < values.length; i++) {
    const value = values[i];
    if (picked.length === k && !(value > values[picked[k - 1]])) continue;
    let at = picked.length === k ? k - 1 : picked.length;
    while (at > 0 && value > values[picked[at - 1]]) at--;
    picked.splice(at, 0, i);
    if (picked.length > k) picked.pop();
  }
  return picked;
}

/**
 * Decode `inputs` prefixes with the model's step function and return the new token ids, one array
 * per returned caption (inputs * num_return_sequences, best first), padded with pad_token_id to
 * the longest, as the engine's result tensor.
 *
 * `model.prefill(rowsPerInput)` runs the prefixes and returns their next-token logits
 * ([inputs * vocab] float32) after repeating each input's cache rowsPerInput times;
 * `model.step(tokens, parents)` first reorders the cache rows (parents[r]: the row that row r
 * continues; null: unchanged), then feeds one token per row and returns [rows * vocab] logits.
 */
export async function generate(model, inputs, vocab, spec) {
  const rowsPerInput = spec.num_beams;
  let logits = await model.prefill(rowsPerInput);
  if (rowsPerInput > 1) logits = repeatRows(logits, inputs, rowsPerInput, vocab);
  const search = spec.num_beams > 1 ? new BeamSearch(spec, inputs, vocab) : new GreedySearch(spec, inputs, vocab);
  for (let step = 0; step < spec.max_new_tokens; step++) {
    search.select(step, logits);
    if (search.allFinished() || step === spec.max_new_tokens - 1) break;
    // after the prefill every row of an input holds the same cache: nothing to reorder yet
    logits = await model.step(search.nextInput(step), step > 0 ? search.parents : null);
  }
  return search.result();
}

function repeatRows(logits, inputs, times, vocab) {
  const out = new Float32Array(inputs * times * vocab);
  for (let b = 0; b < inputs; b++) {
    for (let r = 0; r < times; r++) out.set(logits.subarray(b * vocab, (b + 1) * vocab), (b * times + r) * vocab);
  }
  return out;
}

/** One token per row per step, the argmax (engine.search.GreedySearch without sampling). */
export class GreedySearch {
  constructor(spec, rows, vocab) {
    this.spec = spec;
    this.vocab = vocab;
    this.tokens = Array.from({ length: rows }, () => []);
    this.finished = new Array(rows).fill(false);
    this.lengths = new Array(rows).fill(0);
    this.stops = new Set(spec.stop_token_ids);
    this.parents = null;
  }

  select(step, logits) {
    const { spec, vocab } = this;
    for (let row = 0; row < this.tokens.length; row++) {
      let scores = logits.subarray(row * vocab, (row + 1) * vocab);
      if (processesLogits(spec)) scores = processLogits(Float32Array.from(scores), this.tokens[row], step, spec);
      const chosen = argmax(scores);
      if (!this.finished[row]) this.lengths[row]++;
      this.tokens[row].push(this.finished[row] ? spec.pad_token_id : chosen);
      if (this.stops.has(chosen)) this.finished[row] = true;
    }
  }

  nextInput(step) {
    return Int32Array.from(this.tokens, (row) => row[step]);
  }

  allFinished() {
    return this.finished.every(Boolean);
  }

  result() {
    const length = Math.max(...this.lengths);
    return this.tokens.map((row) => row.slice(0, length));
  }
}

/**
 * Batched beam search with the semantics of Hugging Face generate(num_beams=...) as the engine
 * implements them: candidates, finished hypotheses, length penalty, early stopping (see the
 * docstring of engine.search.BeamSearch, of which this is a per-input transcription).
 */
export class BeamSearch {
  constructor(spec, batch, vocab) {
    this.spec = spec;
    this.batch = batch;
    this.vocab = vocab;
    const beams = spec.num_beams;
    this.candidates = Math.max(2, 1 + spec.stop_token_ids.length) * beams;
    this.stops = new Set(spec.stop_token_ids);
    const pad = () => new Array(spec.max_new_tokens).fill(spec.pad_token_id);
    // running beams, per input
    this.tokens = Array.from({ length: batch }, () => Array.from({ length: beams }, pad));
    this.scores = Array.from({ length: batch }, () => Array.from({ length: beams }, (_, i) => (i === 0 ? 0 : -Infinity)));
    this.parents = Int32Array.from({ length: batch * beams }, (_, i) => i);
    // finished hypotheses, best first
    this.done = Array.from({ length: batch }, () =>
      Array.from({ length: beams }, () => ({ tokens: pad(), score: -Infinity, length: 0, valid: false })),
    );
    this.open = new Array(batch).fill(true);
  }

  select(step, logits) {
    const { spec, vocab } = this;
    const beams = spec.num_beams;
    const penalty = f32((step + 1) ** spec.length_penalty);
    for (let b = 0; b < this.batch; b++) {
      // 1. the top continuations of all beams of the input
      const totals = new Float32Array(beams * vocab);
      for (let beam = 0; beam < beams; beam++) {
        const row = b * beams + beam;
        const history = this.tokens[b][beam].slice(0, step);
        const logProbs = processLogits(logSoftmax(logits.subarray(row * vocab, (row + 1) * vocab)), history, step, spec);
        const score = this.scores[b][beam];
        for (let v = 0; v < vocab; v++) totals[beam * vocab + v] = logProbs[v] + score;
      }
      const candidates = topK(totals, this.candidates).map((flat, rank) => {
        const beam = Math.floor(flat / vocab);
        const token = flat % vocab;
        const tokens = this.tokens[b][beam].slice();
        tokens[step] = token;
        const ends = this.stops.has(token) || step === spec.max_new_tokens - 1;
        return { beam, token, tokens, score: totals[flat], ends, rank };
      });

      // 2. finished candidates join the hypotheses if they rank among the best `beams`
      const done = this.done[b];
      const full = done.every((h) => h.valid);
      const accepting = this.open[b] && !(full && spec.early_stopping);
      const joining = candidates.map((c) => {
        const joins = c.ends && c.rank < beams && accepting;
        return { tokens: c.tokens, score: joins ? f32(c.score / penalty) : -Infinity, length: step + 1, valid: joins };
      });
      const merged = [...done, ...joining];
      this.done[b] = topK(
        merged.map((h) => h.score),
        beams,
      ).map((i) => merged[i]);

      // 3. the best unfinished candidates run on
      const running = candidates.map((c) => (c.ends ? -Infinity : c.score));
      const picks = topK(running, beams);
      this.scores[b] = picks.map((i) => running[i]);
      this.tokens[b] = picks.map((i) => candidates[i].tokens);
      picks.forEach((i, beam) => {
        this.parents[b * beams + beam] = candidates[i].beam + b * beams;
      });

      // 4. can the best running beam still beat the worst hypothesis? (HF's heuristic)
      const bestRunning = f32(this.scores[b][0] / penalty);
      const worstDone = Math.min(...this.done[b].map((h) => h.score));
      this.open[b] = this.open[b] && (!this.done[b].every((h) => h.valid) || bestRunning > worstDone);
    }
  }

  nextInput(step) {
    return Int32Array.from(this.tokens.flat(), (row) => row[step]);
  }

  allFinished() {
    return this.open.every((open, b) => !open || (this.done[b].every((h) => h.valid) && this.spec.early_stopping));
  }

  result() {
    const n = this.spec.num_return_sequences;
    const best = this.done.flatMap((hypotheses) => hypotheses.slice(0, n));
    const length = Math.max(...best.map((h) => h.length));
    return best.map((h) => h.tokens.slice(0, length));
  }
}
