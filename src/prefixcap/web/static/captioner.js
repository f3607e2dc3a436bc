/**
 * prefixcap in the browser: caption images with a `prefixcap export web` folder on onnxruntime-web.
 * Images are decoded, preprocessed and captioned in the page: nothing is uploaded, and after
 * `load` no request is made.
 *
 *     import { Captioner } from "./captioner.js";
 *     const c = await Captioner.load("./");                 // the export folder's URL
 *     const text = await c.caption(file, { numBeams: 3, maxNewTokens: 20 });
 *
 * `image` may be a File or Blob (any format the browser decodes), an ImageBitmap, an <img>,
 * a canvas, an ImageData, or {data, width, height} with packed RGB or RGBA bytes.
 *
 * Options (unset ones take the model's defaults, as in Python): numBeams, maxNewTokens,
 * minNewTokens, lengthPenalty, earlyStopping, repetitionPenalty, noRepeatNgramSize,
 * numReturnSequences (`captions` returns them all), and the text options keepPrompt, prefix, suffix.
 * Greedy decoding and beam search follow prefixcap's decoding engine token for token; sampling
 * is not offered. The model's own prompt is used (prompt: "" for none).
 */

import { modelPixels, normalize, rgbFromRGBA } from "./preprocess.js";
import { generate, resolveOptions } from "./search.js";
import { TokenDecoder } from "./text.js";

export const FORMAT = "prefixcap-web";
export const FORMAT_VERSION = 1;
export const DEFAULT_MAX_PIXELS = 50_000_000; // as `prefixcap serve`: larger images are refused

const OPTION_NAMES = {
  maxNewTokens: "max_new_tokens",
  minNewTokens: "min_new_tokens",
  numBeams: "num_beams",
  lengthPenalty: "length_penalty",
  earlyStopping: "early_stopping",
  repetitionPenalty: "repetition_penalty",
  noRepeatNgramSize: "no_repeat_ngram_size",
  numReturnSequences: "num_return_sequences",
};
const TEXT_OPTIONS = ["keepPrompt", "prefix", "suffix", "prompt"];

export class Captioner {
  /**
   * Load an export: its manifest, onnxruntime-web from the export's own ort/ folder, both graphs,
   * the embeddings and the tokenizer data.
   * @param {string|URL} url the export folder
   * @param {object} [settings]
   * @param {"auto"|"wasm"|"webgpu"} [settings.backend] auto: WebGPU for a float32 export when the
   *   browser has an adapter, else WASM (int8 and int4 exports always run on WASM)
   * @param {number} [settings.threads] WASM threads (default: all cores when the page is
   *   cross-origin isolated, else 1)
   * @param {(progress: {file: string, loaded: number, total: number}) => void} [settings.onProgress]
   */
  static async load(url = "./", { backend = "auto", threads, onProgress = () => {} } = {}) {
    if (threads !== undefined && !(Number.isInteger(threads) && threads >= 1)) throw new RangeError("threads must be an integer >= 1");
    const base = new URL(String(url).endsWith("/") ? url : `${url}/`, globalThis.location?.href);
    const manifest = await fetchJSON(new URL("prefixcap_web.json", base));
    checkManifest(manifest);
    const chosen = await chooseBackend(manifest, backend);
    const ort = await import(new URL(manifest.ort.bundles[chosen], base).href);
    ort.env.wasm.wasmPaths = new URL(manifest.ort.directory, base).href;
    ort.env.wasm.numThreads = threads ?? (globalThis.crossOriginIsolated ? navigator.hardwareConcurrency || 1 : 1);
    ort.env.logLevel = "error";

    const files = manifest.files;
    const total = Object.values(manifest.sizes).reduce((a, b) => a + b, 0);
    let done = 0;
    const download = async (name) => {
      const bytes = await fetchBytes(new URL(files[name], base), manifest.sizes[name], (loaded) =>
        onProgress({ file: files[name], loaded: done + loaded, total }),
      );
      done += bytes.byteLength;
      return bytes;
    };
    const options = { executionProviders: [chosen], graphOptimizationLevel: "all", logSeverityLevel: 3 };
    const encoder = await ort.InferenceSession.create(await download("encoder"), options);
    const decoderBytes = await download("decoder"); // onnxruntime-web copies it: the bytes stay ours
    const decoder = await ort.InferenceSession.create(decoderBytes, options);
    const embeddings = readEmbeddings(files.embeddings ? await download("embeddings") : decoderBytes, manifest);
    const text = JSON.parse(new TextDecoder().decode(await download("text")));
    return new Captioner({ ort, manifest, encoder, decoder, embeddings, text, backend: chosen, threads: ort.env.wasm.numThreads });
  }

  constructor({ ort, manifest, encoder, decoder, embeddings, text, backend, threads }) {
    this.ort = ort;
    this.manifest = manifest;
    this.encoder = encoder;
    this.decoder = decoder;
    this.embeddings = embeddings;
    this.text = new TokenDecoder(text);
    this.levels = Float32Array.from(manifest.image.levels.flat());
    /** What runs: backend ("wasm" or "webgpu"), WASM threads, precision, onnxruntime-web version. */
    this.info = { backend, threads: backend === "wasm" ? threads : null, precision: manifest.precision, ort: manifest.ort.version };
  }

  /** The best caption of `image`. */
  async caption(image, options = {}) {
    return (await this.captions(image, options))[0];
  }

  /** The image's numReturnSequences captions, best first. */
  async captions(image, options = {}) {
    const [ids] = await this.generate([image], options);
    const promptIds = options.keepPrompt ? this.promptIds(options.prompt) : [];
    const { prefix = "", suffix = "" } = options;
    return ids.map((row) => `${prefix}${this.text.caption([...promptIds, ...row])}${suffix}`);
  }

  /**
   * New token ids of each image's captions, as the Python model's generate() returns them (rows
   * padded with the pad token to the batch's longest): [images][numReturnSequences][T].
   */
  async generate(images, options = {}) {
    const spec = this.spec(options);
    const pixels = await Promise.all(images.map((image) => this.pixels(image, options)));
    const prefix = await this.prefix(pixels, this.promptIds(options.prompt));
    const rows = await generate(this.stepper(prefix, images.length), images.length, this.manifest.model.vocab_size, spec);
    const n = spec.num_return_sequences;
    return images.map((_, i) => rows.slice(i * n, (i + 1) * n));
  }

  /**
   * The model's view of an image: [3 * H * W] RGB bytes after the resize and crop, as prefixcap's
   * ImagePreprocessor.pixels gives them in Python. Returns {data, width, height} (packed RGB).
   */
  async pixels(image, { maxPixels = DEFAULT_MAX_PIXELS } = {}) {
    return modelPixels(await decodeImage(image, maxPixels), this.manifest.image.resize);
  }

  promptIds(prompt) {
    if (prompt === undefined || prompt === null || prompt === this.manifest.text.prompt) return this.manifest.text.prompt_ids;
    if (prompt === "") return [];
    throw new RangeError("only the model's own prompt (or none: prompt \"\") runs in the browser: its token ids were computed at export");
  }

  /** The decode spec: options over the model's defaults, checked against the decoder's positions. */
  spec(options) {
    const requested = {};
    for (const [name, value] of Object.entries(options)) {
      if (OPTION_NAMES[name]) requested[OPTION_NAMES[name]] = value;
      else if (!TEXT_OPTIONS.includes(name) && name !== "maxPixels") throw new RangeError(`unknown option ${name}`);
    }
    const { text, model, generation } = this.manifest;
    const spec = resolveOptions(generation, requested, { stopTokenIds: text.stop_token_ids, padTokenId: text.pad_token_id });
    const limit = model.max_positions - model.prefix_length - this.promptIds(options.prompt).length;
    if (spec.max_new_tokens > limit) throw new RangeError(`maxNewTokens must be <= ${limit}: the decoder has ${model.max_positions} positions`);
    return spec;
  }

  /** Prefix embeddings [B, K + prompt, hidden] of preprocessed pixels: the encoder graph, then the prompt's embeddings. */
  async prefix(pixels, promptIds) {
    const { height, width } = this.manifest.image.resize;
    const plane = 3 * height * width;
    const input = new Float32Array(pixels.length * plane);
    pixels.forEach((p, i) => normalize(p, this.levels, input.subarray(i * plane, (i + 1) * plane)));
    const feeds = { pixel_values: new this.ort.Tensor("float32", input, [pixels.length, 3, height, width]) };
    const { prefix_embeds: embeds } = await this.encoder.run(feeds);
    const [batch, length, hidden] = embeds.dims;
    const total = length + promptIds.length;
    const out = new Float32Array(batch * total * hidden);
    for (let b = 0; b < batch; b++) {
      out.set(embeds.data.subarray(b * length * hidden, (b + 1) * length * hidden), b * total * hidden);
      promptIds.forEach((id, i) => this.embed(id, out.subarray((b * total + length + i) * hidden)));
    }
    return { data: out, dims: [batch, total, hidden] };
  }

  /** Write the embedding of token `id` into `out` (float32 as stored, int8 times the token's scale, or int4 blocks). */
  embed(id, out) {
    const { weight, scale, hidden, blockSize, vocab } = this.embeddings;
    if (blockSize) {
      // MatMulNBits' layout: per row, blocks of blockSize values, two a byte (low nibble first), each + 8
      const blocks = Math.ceil(hidden / blockSize);
      const bytes = weight.subarray(id * blocks * (blockSize / 2));
      const scales = scale.subarray(id * blocks);
      for (let i = 0; i < hidden; i++) {
        const byte = bytes[i >> 1];
        out[i] = ((i & 1 ? byte >> 4 : byte & 15) - 8) * scales[Math.floor(i / blockSize)];
      }
    } else if (!scale) out.set(weight.subarray(id * hidden, (id + 1) * hidden));
    else if (vocab) for (let i = 0; i < hidden; i++) out[i] = weight[i * vocab + id] * scale[id]; // the LM head's column
    else for (let i = 0; i < hidden; i++) out[i] = weight[id * hidden + i] * scale[id];
  }

  /** The decoder graph as search.generate's model: prefill, then one token per row per step. */
  stepper(prefix, inputs) {
    const { ort, decoder } = this;
    const { num_layers: layers, num_kv_heads: heads, head_dim: headDim, hidden_size: hidden } = this.manifest.model;
    const names = [];
    for (let layer = 0; layer < layers; layer++) for (const kind of ["key", "value"]) names.push(`${layer}.${kind}`);
    let past = null; // per name: {data, rows, length}
    let pastLength = 0;
    const run = async (embeds, rows, length) => {
      const feeds = {
        inputs_embeds: new ort.Tensor("float32", embeds, [rows, length, hidden]),
        // every row as long as the others: the page decodes one prompt for all its rows
        lengths: new ort.Tensor("int64", new BigInt64Array(rows).fill(BigInt(pastLength + length)), [rows]),
      };
      for (const name of names) {
        const data = past ? past[name] : new Float32Array(0);
        feeds[`past.${name}`] = new ort.Tensor("float32", data, [rows, heads, pastLength, headDim]);
      }
      const out = await decoder.run(feeds);
      past = Object.fromEntries(names.map((name) => [name, out[`present.${name}`].data]));
      pastLength += length;
      return out.logits.data;
    };
    const rowSize = () => heads * pastLength * headDim;
    let rows = inputs;
    return {
      prefill: async (rowsPerInput) => {
        const logits = await run(prefix.data, inputs, prefix.dims[1]);
        if (rowsPerInput > 1) {
          const parents = Int32Array.from({ length: inputs * rowsPerInput }, (_, r) => Math.floor(r / rowsPerInput));
          past = reorder(past, parents, rowSize());
          rows = inputs * rowsPerInput;
        }
        return logits;
      },
      step: async (tokens, parents) => {
        if (parents) past = reorder(past, parents, rowSize());
        const embeds = new Float32Array(rows * hidden);
        tokens.forEach((id, r) => this.embed(id, embeds.subarray(r * hidden, (r + 1) * hidden)));
        return run(embeds, rows, 1);
      },
    };
  }

  /** Release both sessions. */
  async dispose() {
    await this.encoder.release();
    await this.decoder.release();
  }
}

function reorder(past, parents, rowSize) {
  const out = {};
  for (const [name, data] of Object.entries(past)) {
    const copy = new Float32Array(parents.length * rowSize);
    parents.forEach((parent, r) => copy.set(data.subarray(parent * rowSize, (parent + 1) * rowSize), r * rowSize));
    out[name] = copy;
  }
  return out;
}

function checkManifest(manifest) {
  if (manifest?.format !== FORMAT) throw new Error(`not a prefixcap web export (format is not ${FORMAT})`);
  if (manifest.format_version !== FORMAT_VERSION) {
    throw new Error(`export format_version ${manifest.format_version}: this page reads ${FORMAT_VERSION}; export the model again`);
  }
}

async function chooseBackend(manifest, backend) {
  if (!["auto", "wasm", "webgpu"].includes(backend)) throw new RangeError(`backend ${backend}: choose auto, wasm or webgpu`);
  const offered = manifest.ort.bundles;
  if (backend === "wasm") return "wasm";
  const adapter = offered.webgpu && globalThis.navigator?.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (adapter) return "webgpu";
  if (backend === "webgpu") {
    throw new Error(offered.webgpu ? "this browser offers no WebGPU adapter" : `${manifest.precision} exports run on WASM only`);
  }
  return "wasm";
}

async function fetchJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

/** The bytes of `url`, reporting progress; refuses a file whose size is not the manifest's. */
async function fetchBytes(url, size, onProgress) {
  const response = await fetch(url);
  if (!response.ok || !response.body) throw new Error(`${url}: HTTP ${response.status}`);
  const bytes = new Uint8Array(size);
  const reader = response.body.getReader();
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (loaded + value.byteLength > size) throw new Error(`${url}: larger than the manifest says (${size} bytes)`);
    bytes.set(value, loaded);
    loaded += value.byteLength;
    onProgress(loaded);
  }
  if (loaded !== size) throw new Error(`${url}: ${loaded} bytes, the manifest says ${size}`);
  return bytes;
}

/**
 * Token embeddings from the export's safetensors file: float32 "weight", int8 "weight" with a float32
 * "scale" per row, or int4 blocks (uint8 "weight", float32 "scale" per block); int8 values and int4
 * blocks may instead be byte ranges of the decoder graph (`bytes`), copied out of it (int8: the LM
 * head's [hidden, vocab] values, a column per token, returned with `vocab`).
 */
export function readEmbeddings(bytes, manifest) {
  const { vocab_size: vocab, hidden_size: hidden } = manifest.model;
  const copy = (offset, length) => bytes.buffer.slice(bytes.byteOffset + offset, bytes.byteOffset + offset + length);
  const int8Ranges = manifest.int8_embeddings;
  if (manifest.embeddings === "int8" && int8Ranges?.weight) {
    const [weightAt, weightLength] = int8Ranges.weight;
    const [scaleAt, scaleLength] = int8Ranges.scale;
    if (weightLength !== vocab * hidden || scaleLength !== vocab * 4) throw new Error("embeddings: wrong shape");
    return { weight: new Int8Array(copy(weightAt, weightLength)), scale: new Float32Array(copy(scaleAt, scaleLength)), hidden, vocab };
  }
  const int4 = manifest.int4_embeddings;
  if (manifest.embeddings === "int4" && int4?.weight) {
    const blocks = Math.ceil(hidden / int4.block_size);
    const [weightAt, weightLength] = int4.weight;
    const [scaleAt, scaleLength] = int4.scale;
    if (weightLength !== (vocab * blocks * int4.block_size) / 2 || scaleLength !== vocab * blocks * 4) throw new Error("embeddings: wrong shape");
    return { weight: new Uint8Array(copy(weightAt, weightLength)), scale: new Float32Array(copy(scaleAt, scaleLength)), hidden, blockSize: int4.block_size };
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  const start = bytes.byteOffset + 8 + headerLength;
  const tensor = (name, Type, dtype) => {
    const entry = header[name];
    if (!entry || entry.dtype !== dtype) throw new Error(`embeddings: no ${dtype} tensor ${name}`);
    const [from, to] = entry.data_offsets;
    const offset = start + from;
    if (offset % Type.BYTES_PER_ELEMENT === 0) return new Type(bytes.buffer, offset, (to - from) / Type.BYTES_PER_ELEMENT);
    return new Type(bytes.buffer.slice(offset, start + to)); // a copy, aligned for the typed array
  };
  if (manifest.embeddings === "int4") {
    const blocks = Math.ceil(hidden / int4.block_size);
    const weight = tensor("weight", Uint8Array, "U8");
    const scale = tensor("scale", Float32Array, "F32");
    if (weight.length !== (vocab * blocks * int4.block_size) / 2 || scale.length !== vocab * blocks) throw new Error("embeddings: wrong shape");
    return { weight, scale, hidden, blockSize: int4.block_size };
  }
  const int8 = manifest.embeddings === "int8";
  const weight = int8 ? tensor("weight", Int8Array, "I8") : tensor("weight", Float32Array, "F32");
  const scale = int8 ? tensor("scale", Float32Array, "F32") : null;
  if (weight.length !== vocab * hidden || (scale && scale.length !== vocab)) throw new Error("embeddings: wrong shape");
  return { weight, scale, hidden };
}

/**
 * Decode an image to packed RGB bytes, upright (EXIF orientation applied) and without colour
 * management (as Pillow reads it); transparent pixels are composited on white, as in Python.
 */
export async function decodeImage(image, maxPixels = DEFAULT_MAX_PIXELS) {
  const name = image?.name ? `${image.name}: ` : "";
  if (image && typeof image.width === "number" && image.data) {
    const { data, width, height } = image;
    checkSize(name, width, height, maxPixels);
    if (data.length === width * height * 4) return rgbFromRGBA(data, width, height);
    if (data.length === width * height * 3) return { data: Uint8Array.from(data), width, height };
    throw new RangeError(`${name}pixel data is not ${width}x${height} RGB or RGBA`);
  }
  let bitmap = image;
  if (image instanceof Blob) {
    try {
      bitmap = await createImageBitmap(image, { imageOrientation: "from-image", premultiplyAlpha: "none", colorSpaceConversion: "none" });
    } catch {
      throw new Error(`${name}not an image, or an unsupported format`);
    }
  }
  const width = bitmap.naturalWidth || bitmap.displayWidth || bitmap.width;
  const height = bitmap.naturalHeight || bitmap.displayHeight || bitmap.height;
  checkSize(name, width, height, maxPixels);
  const canvas = typeof OffscreenCanvas === "function" ? new OffscreenCanvas(width, height) : Object.assign(document.createElement("canvas"), { width, height });
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  if (bitmap !== image) bitmap.close();
  return rgbFromRGBA(context.getImageData(0, 0, width, height).data, width, height);
}

function checkSize(name, width, height, maxPixels) {
  if (!(width > 0 && height > 0)) throw new RangeError(`${name}image has no pixels`);
  if (width * height > maxPixels) {
    throw new RangeError(`${name}too many pixels (${width}x${height} = ${(width * height).toLocaleString("en")} > limit ${maxPixels.toLocaleString("en")})`);
  }
}
