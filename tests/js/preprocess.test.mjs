// Unit tests of the web export's preprocessing (tests/test_web_js.py compares it with Pillow).
import assert from "node:assert/strict";
import { test } from "node:test";

import { RESAMPLE, crop, modelPixels, normalize, resize, rgbFromRGBA } from "../../src/prefixcap/web/static/preprocess.js";

const image = (width, height, fill) => ({ data: Uint8Array.from({ length: width * height * 3 }, fill), width, height });

test("a resize to the same size is a copy", () => {
  const source = image(5, 4, (_, i) => (i * 37) % 256);
  const out = resize(source, 5, 4, RESAMPLE.BICUBIC);
  assert.deepEqual(out.data, source.data);
  assert.notEqual(out.data, source.data);
});

test("a box of the output size at integer offsets is a crop, as in Pillow", () => {
  const source = image(6, 5, (_, i) => (i * 11) % 256);
  assert.deepEqual(resize(source, 3, 2, RESAMPLE.LANCZOS, [2, 1, 5, 3]), crop(source, 2, 1, 5, 3));
});

test("BOX halves a width by averaging pixel pairs, rounding halves up", () => {
  const source = { data: Uint8Array.from([10, 0, 255, 21, 1, 0]), width: 2, height: 1 };
  assert.deepEqual([...resize(source, 1, 1, RESAMPLE.BOX).data], [16, 1, 128]);
});

test("filters with negative lobes clip to 0..255", () => {
  // a hard edge overshoots under BICUBIC and LANCZOS: the results stay bytes
  const source = image(8, 1, (_, i) => (Math.floor(i / 3) < 4 ? 0 : 255));
  for (const filter of [RESAMPLE.BICUBIC, RESAMPLE.LANCZOS]) {
    const out = resize(source, 13, 1, filter);
    assert.equal(out.data.length, 13 * 3);
    assert.ok(out.data.includes(0) && out.data.includes(255));
  }
});

test("NEAREST is refused: it is another code path in Pillow", () => {
  assert.throws(() => resize(image(4, 4, () => 0), 2, 2, RESAMPLE.NEAREST), /not supported/);
});

test("modelPixels resizes the short side and crops the centre", () => {
  const geometry = { shortest_edge: 8, height: 6, width: 6, resample: RESAMPLE.BILINEAR };
  for (const [w, h] of [[40, 20], [20, 40], [8, 8], [9, 1000]]) {
    const out = modelPixels(image(w, h, (_, i) => i % 256), geometry);
    assert.deepEqual([out.width, out.height, out.data.length], [6, 6, 6 * 6 * 3]);
  }
  const squash = modelPixels(image(30, 10, () => 7), { shortest_edge: null, height: 4, width: 5, resample: RESAMPLE.BICUBIC });
  assert.deepEqual([squash.width, squash.height], [5, 4]);
});

test("a banner is resized in its kept part alone, at the output size", () => {
  // 1 x 200,000 pixels would become 32 x 6,400,000 before the crop
  const out = modelPixels(image(1, 200_000, (_, i) => (i * 7) % 256), { shortest_edge: 32, height: 32, width: 32, resample: RESAMPLE.BICUBIC });
  assert.deepEqual([out.width, out.height], [32, 32]);
});

test("alpha is composited on white with Pillow's rounding", () => {
  const rgba = Uint8Array.from([10, 20, 30, 255, 0, 0, 0, 0, 0, 100, 200, 128]);
  assert.deepEqual([...rgbFromRGBA(rgba, 3, 1).data], [10, 20, 30, 255, 255, 255, 127, 177, 227]);
});

test("normalize looks up each channel's level", () => {
  const levels = Float32Array.from({ length: 768 }, (_, i) => i / 10);
  const pixels = { data: Uint8Array.from([1, 2, 3, 4, 5, 6]), width: 2, height: 1 };
  assert.deepEqual([...normalize(pixels, levels)], [0.1, 0.4, 25.8, 26.1, 51.5, 51.8].map(Math.fround));
});
