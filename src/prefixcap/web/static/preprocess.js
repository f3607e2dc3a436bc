// Image preprocessing, equal in uint8 pixels to prefixcap's Python path
// (prefixcap.inputs.preprocess.ImagePreprocessor.pixels, then normalize).
//
// The resize is Pillow's convolution resampling for 8-bit images (libImaging/Resample.c): per output
// pixel, filter weights in double precision, normalised to sum 1, turned into 22-bit fixed-point
// integers, then a horizontal pass into an 8-bit image and a vertical pass from it, each rounding
// and clipping to 0..255. Integer sums are exact in JS doubles, so the result is Pillow's, bit for bit.
// Alpha is composited on white with Pillow's paste arithmetic (prefixcap.inputs.images.to_rgb).

export const RESAMPLE = Object.freeze({ NEAREST: 0, LANCZOS: 1, BILINEAR: 2, BICUBIC: 3, BOX: 4, HAMMING: 5 });

// resize images above this many pixels only in the part the crop keeps (MAX_RESIZED_PIXELS in Python)
export const MAX_RESIZED_PIXELS = 2 ** 25;

const PRECISION_BITS = 32 - 8 - 2;

function sinc(x) {
  if (x === 0.0) return 1.0;
  x *= Math.PI;
  return Math.sin(x) / x;
}

// [filter, support]; constants as in Resample.c (0.54f and 0.46f are float literals there)
const FILTERS = {
  [RESAMPLE.BOX]: [(x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0), 0.5],
  [RESAMPLE.BILINEAR]: [(x) => ((x = Math.abs(x)) < 1.0 ? 1.0 - x : 0.0), 1.0],
  [RESAMPLE.HAMMING]: [
    (x) => {
      x = Math.abs(x);
      if (x === 0.0) return 1.0;
      if (x >= 1.0) return 0.0;
      x *= Math.PI;
      return (Math.sin(x) / x) * (Math.fround(0.54) + Math.fround(0.46) * Math.cos(x));
    },
    1.0,
  ],
  [RESAMPLE.BICUBIC]: [
    (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
    2.0,
  ],
  [RESAMPLE.LANCZOS]: [(x) => (-3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0), 3.0],
};

/** Whether `resample` is a filter this module reproduces (all of Pillow's but NEAREST). */
export function supportsResample(resample) {
  return Object.hasOwn(FILTERS, resample);
}

// Resample.c precompute_coeffs + normalize_coeffs_8bpc: for each output pixel, the first input
// pixel, the count, and the fixed-point weights (ksize per output pixel).
function coefficients(inSize, in0, in1, outSize, resample) {
  const [filter, baseSupport] = FILTERS[resample];
  const scale = Math.fround(in1 - in0) / outSize; // in0, in1 are C floats
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = baseSupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const inverse = 1.0 / filterscale;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  const row = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let total = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = filter((x + xmin - center + 0.5) * inverse);
      row[x] = w;
      total += w;
    }
    for (let x = 0; x < xmax; x++) {
      const w = total !== 0.0 ? row[x] / total : row[x];
      weights[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS)) : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, weights };
}

function clip8(sum) {
  const value = sum >> PRECISION_BITS;
  return value < 0 ? 0 : value > 255 ? 255 : value;
}

/**
 * Pillow's `Image.resize((width, height), resample, box)` of an RGB image.
 * @param {{data: Uint8Array, width: number, height: number}} image packed RGB, row-major
 * @param {number[]} [box] [left, top, right, bottom] of the source region (floats; whole image if omitted)
 * @param {boolean} [verticalFirst] Pillow >= 13's order: when the width does not shrink but the
 *   height does, the vertical pass runs first (older Pillow: always the horizontal one)
 * @returns {{data: Uint8Array, width: number, height: number}}
 */
export function resize(image, width, height, resample, box = [0, 0, image.width, image.height], verticalFirst = true) {
  if (!supportsResample(resample)) throw new RangeError(`resample filter ${resample} is not supported`);
  if (!(width >= 1 && height >= 1)) throw new RangeError("height and width must be > 0");
  const [b0, b1, b2, b3] = box.map(Math.fround); // PIL passes the box to C as floats
  if (image.width === width && image.height === height && b0 === 0 && b1 === 0 && b2 === width && b3 === height) {
    return { data: image.data.slice(), width, height }; // Image.resize returns a copy
  }
  const [boxWidth, boxHeight] = [Math.fround(b2 - b0), Math.fround(b3 - b1)];
  if (b0 === Math.trunc(b0) && boxWidth === width && b1 === Math.trunc(b1) && boxHeight === height) {
    return crop(image, b0, b1, b2, b3); // _imaging.c: an integer box of the output size is a crop
  }
  const needHorizontal = width !== image.width || b0 !== 0 || b2 !== width;
  const needVertical = height !== image.height || b1 !== 0 || b3 !== height;
  const horizontalFirst = !(verticalFirst && width >= boxWidth && height < boxHeight);
  const vertical = coefficients(image.height, b1, b3, height, resample);
  const horizontalWeights = needHorizontal ? coefficients(image.width, b0, b2, width, resample) : null;
  if (!horizontalFirst) {
    const shrunk = verticalPass(image, height, 0, vertical); // needVertical: the height shrinks
    return needHorizontal ? horizontal(shrunk, width, 0, height, horizontalWeights) : shrunk;
  }
  let source = image;
  let rowOffset = 0;
  if (needHorizontal) {
    // only the rows the vertical pass reads
    const first = vertical.bounds[0];
    const last = vertical.bounds[height * 2 - 2] + vertical.bounds[height * 2 - 1];
    source = horizontal(image, width, first, last - first, horizontalWeights);
    rowOffset = first;
  }
  if (needVertical) return verticalPass(source, height, rowOffset, vertical);
  return needHorizontal ? source : { data: image.data.slice(), width: image.width, height: image.height };
}

function horizontal(image, width, firstRow, rows, { ksize, bounds, weights }) {
  const out = new Uint8Array(width * rows * 3);
  const input = image.data;
  const half = 1 << (PRECISION_BITS - 1);
  for (let y = 0; y < rows; y++) {
    const line = (y + firstRow) * image.width * 3;
    for (let xx = 0; xx < width; xx++) {
      const xmin = bounds[xx * 2];
      const xmax = bounds[xx * 2 + 1];
      const k = xx * ksize;
      let r = half;
      let g = half;
      let b = half;
      for (let x = 0; x < xmax; x++) {
        const w = weights[k + x];
        const p = line + (x + xmin) * 3;
        r += input[p] * w;
        g += input[p + 1] * w;
        b += input[p + 2] * w;
      }
      const o = (y * width + xx) * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
    }
  }
  return { data: out, width, height: rows };
}

function verticalPass(image, height, rowOffset, { ksize, bounds, weights }) {
  const width = image.width;
  const out = new Uint8Array(width * height * 3);
  const input = image.data;
  const half = 1 << (PRECISION_BITS - 1);
  for (let yy = 0; yy < height; yy++) {
    const ymin = bounds[yy * 2] - rowOffset;
    const ymax = bounds[yy * 2 + 1];
    const k = yy * ksize;
    for (let xx = 0; xx < width; xx++) {
      let r = half;
      let g = half;
      let b = half;
      for (let y = 0; y < ymax; y++) {
        const w = weights[k + y];
        const p = ((y + ymin) * width + xx) * 3;
        r += input[p] * w;
        g += input[p + 1] * w;
        b += input[p + 2] * w;
      }
      const o = (yy * width + xx) * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
    }
  }
  return { data: out, width, height };
}

/** Pillow's `Image.crop((left, top, right, bottom))` of an RGB image, inside its bounds. */
export function crop(image, left, top, right, bottom) {
  const width = right - left;
  const height = bottom - top;
  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    const start = ((y + top) * image.width + left) * 3;
    out.set(image.data.subarray(start, start + width * 3), y * width * 3);
  }
  return { data: out, width, height };
}

/**
 * Packed RGB from RGBA pixels (an ImageData's), transparent pixels composited on white as
 * prefixcap does in Python (Pillow's paste with an alpha mask: (255 * (255 - a) + c * a) / 255,
 * rounded with its DIV255).
 */
export function rgbFromRGBA(rgba, width, height) {
  const out = new Uint8Array(width * height * 3);
  for (let i = 0, o = 0; o < out.length; i += 4, o += 3) {
    const a = rgba[i + 3];
    for (let c = 0; c < 3; c++) {
      if (a === 255) {
        out[o + c] = rgba[i + c];
      } else {
        const t = 255 * (255 - a) + rgba[i + c] * a + 128;
        out[o + c] = ((t >> 8) + t) >> 8;
      }
    }
  }
  return { data: out, width, height };
}

/**
 * The resized and cropped pixels the model sees, as `ImagePreprocessor.pixels` computes them.
 * @param {{data: Uint8Array, width: number, height: number}} image packed RGB
 * @param {{shortest_edge: number|null, height: number, width: number, resample: number,
 *          vertical_first: boolean}} geometry
 *   shortest_edge set: CLIP's and DINOv2's resize of the short side, then a centre crop of
 *   height x width; null: SigLIP's resize of the whole image to height x width; vertical_first:
 *   the pass order of the exporting machine's Pillow (see resize)
 * @returns {{data: Uint8Array, width: number, height: number}} packed RGB, height x width
 */
export function modelPixels(image, geometry) {
  const { shortest_edge: size, height: cropHeight, width: cropWidth, resample, vertical_first: verticalFirst } = geometry;
  const box = [0, 0, image.width, image.height];
  if (size === null) return resize(image, cropWidth, cropHeight, resample, box, verticalFirst);
  const { width, height } = image;
  let newWidth, newHeight; // the processor's arithmetic: the long side is truncated
  if (width <= height) {
    newWidth = size;
    newHeight = Math.trunc((size * height) / width);
  } else {
    newWidth = Math.trunc((size * width) / height);
    newHeight = size;
  }
  const top = Math.floor((newHeight - cropHeight) / 2);
  const left = Math.floor((newWidth - cropWidth) / 2);
  if (newWidth * newHeight <= MAX_RESIZED_PIXELS) {
    const resized = resize(image, newWidth, newHeight, resample, box, verticalFirst);
    return crop(resized, left, top, left + cropWidth, top + cropHeight);
  }
  const xScale = width / newWidth;
  const yScale = height / newHeight;
  const kept = [left * xScale, top * yScale, (left + cropWidth) * xScale, (top + cropHeight) * yScale];
  return resize(image, cropWidth, cropHeight, resample, kept, verticalFirst);
}

/**
 * Model inputs [3, H, W] float32 from packed RGB pixels, through the export's per-channel table
 * of what the image processor's rescale and normalisation make of each 8-bit level.
 * @param {{data: Uint8Array, width: number, height: number}} pixels
 * @param {Float32Array} levels [3 * 256]
 * @param {Float32Array} [out] where to write (3 * H * W values), e.g. one image of a batch
 */
export function normalize(pixels, levels, out = new Float32Array(3 * pixels.width * pixels.height)) {
  const plane = pixels.width * pixels.height;
  const data = pixels.data;
  for (let i = 0; i < plane; i++) {
    out[i] = levels[data[i * 3]];
    out[plane + i] = levels[256 + data[i * 3 + 1]];
    out[2 * plane + i] = levels[512 + data[i * 3 + 2]];
  }
  return out;
}
