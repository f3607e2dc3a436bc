// The web export's JavaScript, driven from Python tests (tests/test_web_js.py): reads one JSON
// request on stdin, writes the JSON answer on stdout. Byte arrays travel as base64.
//   {"op": "pixels", "cases": [{"rgb", "width", "height", "geometry"}]}  -> [{"rgb", "width", "height"}]
//   {"op": "rgba", "rgba", "width", "height"}                             -> {"rgb"}
//   {"op": "normalize", "rgb", "width", "height", "levels"}              -> {"values": base64 float32}
//   {"op": "search", "tables", "cases": [{"spec", "starts"}]}             -> [[token ids per row]]
//   {"op": "text", "text", "sequences": [[ids]]}                          -> ["caption", ...]
//   {"op": "decoders"}                                                     -> the supported decoder types
//   {"op": "embeddings", "bytes", "manifest", "ids"}                       -> {"values": base64 float32 [ids, hidden]}
import { modelPixels, normalize, rgbFromRGBA } from "../../src/prefixcap/web/static/preprocess.js";
import { generate, resolveOptions } from "../../src/prefixcap/web/static/search.js";
import { SUPPORTED_DECODERS, TokenDecoder } from "../../src/prefixcap/web/static/text.js";
import { Captioner, readEmbeddings } from "../../src/prefixcap/web/static/captioner.js";

const bytes = (text) => new Uint8Array(Buffer.from(text, "base64"));
const base64 = (array) => Buffer.from(array.buffer, array.byteOffset, array.byteLength).toString("base64");

/**
 * A scripted decoder, the twin of tests/test_web_js.py's ScriptedForward: the logits of a row at
 * position p after token t, itself after token s, are first[p][t] + second[s] (float32), so the
 * search's cache reordering is exercised: a row's previous token comes from its cache.
 */
function scriptedModel(tables, starts, vocab) {
  const first = new Float32Array(bytes(tables.first).buffer);
  const second = new Float32Array(bytes(tables.second).buffer);
  let histories = starts.map((start) => [start]); // per row: tokens fed so far (the prefix's start token)
  const logitsOf = (rows) => {
    const out = new Float32Array(rows.length * vocab);
    rows.forEach((history, r) => {
      const position = history.length - 1;
      const last = history[position];
      const previous = position > 0 ? history[position - 1] : tables.no_previous;
      for (let v = 0; v < vocab; v++) out[r * vocab + v] = first[(position * vocab + last) * vocab + v] + second[previous * vocab + v];
    });
    return out;
  };
  return {
    prefill: async (rowsPerInput) => {
      const logits = logitsOf(histories);
      histories = histories.flatMap((history) => Array.from({ length: rowsPerInput }, () => history.slice()));
      return logits;
    },
    step: async (tokens, parents) => {
      if (parents) histories = Array.from(parents, (parent) => histories[parent].slice());
      tokens.forEach((token, r) => histories[r].push(token));
      return logitsOf(histories);
    },
  };
}

const ops = {
  pixels: ({ cases }) =>
    cases.map(({ rgb, width, height, geometry }) => {
      const out = modelPixels({ data: bytes(rgb), width, height }, geometry);
      return { rgb: base64(out.data), width: out.width, height: out.height };
    }),
  rgba: ({ rgba, width, height }) => ({ rgb: base64(rgbFromRGBA(bytes(rgba), width, height).data) }),
  normalize: ({ rgb, width, height, levels }) => ({
    values: base64(normalize({ data: bytes(rgb), width, height }, Float32Array.from(levels.flat()))),
  }),
  search: async ({ tables, cases }) => {
    const results = [];
    for (const { spec: options, starts, stop_token_ids: stopTokenIds, pad_token_id: padTokenId } of cases) {
      const spec = resolveOptions({}, options, { stopTokenIds, padTokenId });
      results.push(await generate(scriptedModel(tables, starts, tables.vocab), starts.length, tables.vocab, spec));
    }
    return results;
  },
  text: ({ text, sequences }) => {
    const decoder = new TokenDecoder(text);
    return sequences.map((ids) => decoder.caption(ids));
  },
  decoders: () => SUPPORTED_DECODERS,
  embeddings: ({ bytes: file, manifest, ids }) => {
    const embeddings = readEmbeddings(bytes(file), manifest);
    const out = new Float32Array(ids.length * embeddings.hidden);
    ids.forEach((id, i) => Captioner.prototype.embed.call({ embeddings }, id, out.subarray(i * embeddings.hidden)));
    return { values: base64(out) };
  },
};

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const request = JSON.parse(Buffer.concat(chunks).toString("utf8"));
process.stdout.write(JSON.stringify(await ops[request.op](request)));
