"""Captioning in the browser: `prefixcap export web` writes a static folder that runs an ONNX
export on onnxruntime-web, with the preprocessing, searches and text decoding in JavaScript
(`static/`). Nothing is uploaded: images are captioned in the page."""
