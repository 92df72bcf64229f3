"""Apple's Swift ``StableDiffusionPipeline``, the arithmetic our Core ML packages meet, in Python.

A transliteration of apple/ml-stable-diffusion at commit ``APPLE_COMMIT``, ``swift/StableDiffusion/``:
each line cites the Swift file and function it follows. It stands in for the Swift pipeline on Linux,
where Core ML cannot predict: the "models" are callables taking and returning what ``MLModel.prediction``
would (float32 numpy arrays by feature name), so the tests run our converted PyTorch modules in their
place. Independent of ``instaflow_edge`` on purpose (numpy and the standard library only): it is the
peer, not our reference.

Covered: the BPE tokenizer and the 77-token framing (``BPETokenizer*.swift``, ``TextEncoder.swift``),
``TorchRandomSource`` (the CLI's ``--rng torch``), ``toHiddenStates``, ``performGuidance``,
``DPMSolverMultistepScheduler`` (linspace spacing; the first-order update, which is what one step runs),
``Unet.predictNoise``, ``Decoder.decode`` and ``CGImage.fromShapedArray``; image to image:
``CGImage.planarRGBShapedArray``, ``Encoder.encode`` (its DiagonalGaussianDistribution sample drawn from
the same random source, after the noise), ``Scheduler.addNoise`` and ``calculateTimesteps(strength:)``.
Not covered: PNDM and DiscreteFlow (they crash at ``stepCount 1``: PNDM's ``timeSteps.last!`` on an empty
list, DiscreteFlow's ``linspace(…, 1)`` divides by zero), ControlNet, the safety checker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

APPLE_COMMIT = "e12202c1f6405b83918b58a5d097cd61e3e1f702"
F = np.float32


# ---------------------------------------------------------------------------------------------------
# tokenizer/BPETokenizer.swift, tokenizer/BPETokenizer+Reading.swift


class BPETokenizer:
    start_token = "<|startoftext|>"  # BPETokenizer.swift: startToken
    end_token = "<|endoftext|>"  # BPETokenizer.swift: endToken
    unknown_token = "<|endoftext|>"  # BPETokenizer.swift: unknownToken

    def __init__(self, merges_path: str | Path, vocab_path: str | Path, pad_token: str = "<|endoftext|>"):
        self.merges = self.read_merges(merges_path)  # BPETokenizer.swift: init(mergesAt:vocabularyAt:padToken:)
        self.vocabulary = json.loads(Path(vocab_path).read_bytes())  # +Reading.swift: readVocabulary (JSONDecoder)
        self.pad_token = pad_token

    @staticmethod
    def read_merges(path) -> dict[tuple[str, str], int]:
        merges: dict[tuple[str, str], int] = {}  # +Reading.swift: readMerges
        for index, line in enumerate(Path(path).read_bytes().split(b"\n")[:-1]):  # a line ends at "\n"; rank = line index
            if not line or line[:1] == b"#":  # parseMergesLine: empty or "#" lines are skipped (the index still counts)
                continue
            pair = [p for p in line.split(b" ") if p]  # line.split(separator: " ") drops empty pieces
            if len(pair) != 2:
                raise ValueError(f"invalidMergeFileLine({index + 1})")  # FileReadError.invalidMergeFileLine
            merges[(pair[0].decode(), pair[1].decode())] = index  # merges[pair] = index
        return merges

    @property
    def unknown_token_id(self) -> int:
        return self.vocabulary.get(self.unknown_token, 0)  # vocabulary[unknownToken, default: 0]

    def tokenize(self, text: str, min_count: int | None = None) -> tuple[list[str], list[int]]:
        tokens = [self.start_token]  # tokenize(input:minCount:): tokens.append(startToken)
        tokens += self.encode(text)  # tokens.append(contentsOf: encode(input: input))
        tokens.append(self.end_token)  # tokens.append(endToken)
        if min_count is not None and min_count > len(tokens):  # if let minLen = minCount, minLen > tokens.count
            tokens += [self.pad_token] * (min_count - len(tokens))  # pad with padToken
        ids = [self.vocabulary.get(t, self.unknown_token_id) for t in tokens]  # vocabulary[$0, default: unknownTokenID]
        return tokens, ids

    def decode(self, tokens: list[str]) -> str:
        return "".join(tokens).replace("</w>", " ").replace(self.start_token, "").replace(self.end_token, "")  # decode(tokens:)

    def encode(self, text: str) -> list[str]:
        normalized = text.strip().lower()  # encode(input:): trimmingCharacters(in: .whitespacesAndNewlines).lowercased()
        words = [w for w in normalized.split(" ") if w]  # normalized.split(separator: " ") (empty pieces dropped)
        return [t for w in words for t in self.encode_word(w)]  # words.flatMap({ encode(word: $0) })

    def encode_word(self, word: str) -> list[str]:
        tokens = list(word)  # encode(word:): word.map { String($0) } (characters, not bytes: ASCII prompts assumed)
        if tokens:
            tokens[-1] = tokens[-1] + "</w>"  # tokens[last] = tokens[last] + "</w>"
        while True:
            can_merge = [p for p in self.pairs(tokens) if p in self.merges]  # pairs.filter { merges[$0] != nil }
            if not can_merge:
                break
            should_merge = min(can_merge, key=lambda p: self.merges[p])  # canMerge.min { merges[$0]! < merges[$1]! }
            tokens = self.update(tokens, should_merge)
        return tokens

    @staticmethod
    def pairs(tokens: list[str]) -> set[tuple[str, str]]:
        if len(tokens) <= 1:  # pairs(for:): guard tokens.count > 1
            return set()
        return set(zip(tokens, tokens[1:]))  # TokenPair(prev, current) for each neighbour

    @staticmethod
    def update(tokens: list[str], bigram: tuple[str, str]) -> list[str]:
        if len(tokens) <= 1:  # update(_:merging:): guard tokens.count > 1 else { return [] }
            return []
        new: list[str] = []
        index = 0
        while index < len(tokens):
            rest = tokens[index:]  # remainingTokens = tokens[index...]
            if bigram[0] in rest:  # remainingTokens.firstIndex(of: bigram.first)
                start = index + rest.index(bigram[0])
                new += tokens[index:start]  # append everything before it
                if index < len(tokens) - 1 and tokens[start + 1] == bigram[1]:  # (start is never the last: it carries </w>)
                    new.append(bigram[0] + bigram[1])  # full match, merge
                    index = start + 2
                else:
                    new.append(bigram[0])  # only matched the first
                    index = start + 1
            else:
                new += rest  # no more matches
                break
        return new


def text_encoder_ids(tokenizer: BPETokenizer, text: str, input_length: int = 77) -> list[int]:
    """TextEncoder.swift: encode(_:) up to the ids it feeds the model."""
    tokens, ids = tokenizer.tokenize(text, min_count=input_length)  # tokenizer.tokenize(input: text, minCount: inputLength)
    if len(ids) > input_length:  # if ids.count > inputLength: truncate (dropLast: the <|endoftext|> goes too)
        tokens, ids = tokens[:input_length], ids[:input_length]
    return ids


def text_encoder_encode(model, tokenizer: BPETokenizer, text: str, input_length: int = 77) -> np.ndarray:
    ids = text_encoder_ids(tokenizer, text, input_length)
    float_ids = np.array(ids, dtype=np.float32).reshape(1, input_length)  # encode(ids:): ids.map { Float32($0) }, shape inputShape
    return np.asarray(model({"input_ids": float_ids})["last_hidden_state"], dtype=np.float32)  # featureValue(for: "last_hidden_state")


# ---------------------------------------------------------------------------------------------------
# pipeline/TorchRandomSource.swift (the CLI's --rng torch)


class TorchRandomSource:
    def __init__(self, seed: int):
        self.key = [0] * 624  # State.key
        s = seed & 0xFFFF_FFFF  # init(seed:)
        for i in range(624):
            self.key[i] = s
            s = (1_812_433_253 * (s ^ (s >> 30)) + i + 1) & 0xFFFF_FFFF
        self.pos = 624  # state.pos = state.key.count
        self.next_gauss_value: float | None = None

    def next_uint32(self) -> int:
        n, m, matrix_a, upper, lower = 624, 397, 0x9908_B0DF, 0x8000_0000, 0x7FFF_FFFF  # nextUInt32()
        k = self.key
        if self.pos == 624:
            for i in range(n - m):
                y = (k[i] & upper) | (k[i + 1] & lower)
                k[i] = k[i + m] ^ (y >> 1) ^ (((~(y & 1) + 1) & 0xFFFF_FFFF_FFFF_FFFF) & matrix_a)
            for i in range(n - m, n - 1):
                y = (k[i] & upper) | (k[i + 1] & lower)
                k[i] = k[i + (m - n)] ^ (y >> 1) ^ (((~(y & 1) + 1) & 0xFFFF_FFFF_FFFF_FFFF) & matrix_a)
            y = (k[n - 1] & upper) | (k[0] & lower)
            k[n - 1] = k[m - 1] ^ (y >> 1) ^ (((~(y & 1) + 1) & 0xFFFF_FFFF_FFFF_FFFF) & matrix_a)
            self.pos = 0
        y = k[self.pos]
        self.pos += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C_5680
        y ^= (y << 15) & 0xEFC6_0000
        y ^= y >> 18
        return y & 0xFFFF_FFFF

    def next_double(self) -> float:
        a = (self.next_uint32() << 32) | self.next_uint32()  # next(): (high << 32) | low
        return float(a & 9_007_199_254_740_991) * (1.0 / 9007199254740992.0)  # nextDouble()

    def next_float(self) -> np.float32:
        return F(F(self.next_uint32() & 16_777_215) * F(1.0 / 16777216.0))  # nextFloat(): Float arithmetic

    def next_gauss(self) -> float:
        if self.next_gauss_value is not None:  # nextGauss()
            g, self.next_gauss_value = self.next_gauss_value, None
            return g
        u1 = self.next_double()
        u2 = 1 - self.next_double()
        radius = math.sqrt(-2.0 * math.log(u2))
        theta = 2.0 * math.pi * u1
        self.next_gauss_value = radius * math.sin(theta)
        return radius * math.cos(theta)

    def next_normal(self, mean: float = 0.0, stdev: float = 1.0) -> float:
        return self.next_gauss() * stdev + mean  # nextNormal(mean:stdev:)

    def normal_array(self, count: int, mean: float = 0.0, stdev: float = 1.0) -> np.ndarray:
        if count < 16:  # normalArray(count:mean:stdev:): Box-Muller directly below 16 values
            return np.array([self.next_gauss() * stdev + mean for _ in range(count)], dtype=np.float64)
        data = np.array([float(self.next_float()) for _ in range(count)], dtype=np.float64)  # Double(nextFloat())
        for i in range(0, count - 15, 16):  # stride(from: 0, to: count - 15, by: 16)
            u1 = 1 - data[i:i + 8]  # let u1 = 1 - data[i + j]
            u2 = data[i + 8:i + 16]  # let u2 = data[i + j + 8]
            radius = np.sqrt(-2.0 * np.log(u1))
            theta = 2.0 * math.pi * u2
            data[i:i + 8] = radius * np.cos(theta) * stdev + mean
            data[i + 8:i + 16] = radius * np.sin(theta) * stdev + mean
        if count % 16 != 0:  # a ragged tail: the last 16 from fresh doubles
            i = count - 16
            data[i:] = [self.next_double() for _ in range(16)]
            u1, u2 = 1 - data[i:i + 8], data[i + 8:i + 16].copy()
            radius = np.sqrt(-2.0 * np.log(u1))
            theta = 2.0 * math.pi * u2
            data[i:i + 8] = radius * np.cos(theta) * stdev + mean
            data[i + 8:i + 16] = radius * np.sin(theta) * stdev + mean
        return data

    def normal_shaped_array(self, shape: tuple, mean: float = 0.0, stdev: float = 1.0) -> np.ndarray:
        return self.normal_array(int(np.prod(shape)), mean, stdev).reshape(shape)  # normalShapedArray(_:mean:stdev:)


# ---------------------------------------------------------------------------------------------------
# pipeline/StableDiffusionPipeline.swift (helpers)


def to_hidden_states(embedding: np.ndarray) -> np.ndarray:
    b, s, c = embedding.shape  # toHiddenStates: [B, 77, C] → [B, C, 1, 77]
    states = np.zeros((b, c, 1, s), dtype=np.float32)  # MLShapedArray<Float32>(repeating: 0.0, shape: stateShape)
    for i0 in range(b):
        states[i0, :, 0, :] = embedding[i0].T  # states[scalarAt: i0, i2, 0, i1] = embedding[scalarAt: i0, i1, i2]
    return states


def perform_guidance(noise: np.ndarray, guidance_scale: float) -> np.ndarray:
    g = F(guidance_scale)  # performGuidance(_:_:): unconditioned + guidance * (text - unconditioned), in Float
    return (noise[0:1] + g * (noise[1:2] - noise[0:1])).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# pipeline/Scheduler.swift, pipeline/DPMSolverMultistepScheduler.swift


def linspace(start, end, count: int) -> np.ndarray:
    scale = F(F(end) - F(start)) / F(count - 1)  # Scheduler.swift: linspace, (end - start) / Float(count - 1)
    return np.array([F(F(i) * scale) + F(start) for i in range(count)], dtype=np.float32)  # Float($0)*scale + start


def swift_round(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))  # Foundation round(): halves away from zero


class DPMSolverMultistepScheduler:
    """Linspace spacing, scaled-linear betas: the configuration the CLI's ``--scheduler dpmpp`` builds."""

    init_noise_sigma = F(1)  # Scheduler.swift: initNoiseSigma { 1 }
    solver_order = 2

    def __init__(self, step_count: int = 50, train_step_count: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012):
        self.train_step_count, self.inference_step_count = train_step_count, step_count
        lin = linspace(F(beta_start) ** F(0.5), F(beta_end) ** F(0.5), train_step_count)  # .scaledLinear: pow(betaStart, 0.5)…
        self.betas = (lin * lin).astype(np.float32)  # .map({ $0 * $0 })
        self.alphas = (F(1) - self.betas).astype(np.float32)  # betas.map({ 1.0 - $0 })
        acp = self.alphas.copy()
        for i in range(1, len(acp)):
            acp[i] = F(acp[i] * acp[i - 1])  # alphasCumProd[i] *= alphasCumProd[i - 1]
        self.alphas_cum_prod = acp
        steps = linspace(0, F(train_step_count - 1), step_count + 1)[1:][::-1]  # .linspace: dropFirst().reversed()
        self.time_steps = [swift_round(float(t)) for t in steps]  # .map { Int(round($0)) }
        self.alpha_t = np.sqrt(acp).astype(np.float32)  # vForce.sqrt(alphasCumProd)
        self.sigma_t = np.sqrt((F(1) - acp).astype(np.float32)).astype(np.float32)  # vForce.sqrt(1 - alphasCumProd)
        self.lambda_t = (np.log(self.alpha_t) - np.log(self.sigma_t)).astype(np.float32)  # log(α) - log(σ)
        self.model_outputs: list[np.ndarray] = []
        self.lower_order_stepped = 0

    def calculate_timesteps(self, strength: float | None) -> list[int]:
        if strength is None:  # Scheduler.swift: calculateTimesteps(strength:): guard let strength else { return timeSteps }
            return list(self.time_steps)
        start_step = max(self.inference_step_count - int(F(self.inference_step_count) * F(strength)), 0)  # Int(Float(n) * strength)
        return list(self.time_steps[start_step:])  # Array(timeSteps[startStep...])

    def add_noise(self, original_sample: np.ndarray, noise: list[np.ndarray], strength: float) -> list[np.ndarray]:
        start_step = max(self.inference_step_count - int(F(self.inference_step_count) * F(strength)), 0)  # addNoise(…)
        alpha_prod_t = self.alphas_cum_prod[self.time_steps[start_step]]  # alphasCumProd[timeSteps[startStep]]
        beta_prod_t = F(F(1) - alpha_prod_t)  # 1 - alphaProdt
        sqrt_alpha, sqrt_beta = np.sqrt(alpha_prod_t, dtype=np.float32), np.sqrt(beta_prod_t, dtype=np.float32)  # sqrt (Float)
        return [self.weighted_sum([float(sqrt_alpha), float(sqrt_beta)], [original_sample, n]) for n in noise]

    def convert_model_output(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
                             fused: bool = False) -> np.ndarray:
        alpha_t, sigma_t = self.alpha_t[timestep], self.sigma_t[timestep]  # convertModelOutput (timestepToIndex: identity)
        if fused:  # what a compiler contracting (sample − out·σ) into one fma would give
            return (np.float64(sample) - np.float64(model_output) * np.float64(sigma_t)).astype(np.float32) / alpha_t
        return ((sample - model_output * sigma_t) / alpha_t).astype(np.float32)  # (sample[i] - modelOutput[i] * sigma_t) / alpha_t

    @staticmethod
    def weighted_sum(weights: list[float], values: list[np.ndarray]) -> np.ndarray:
        out = np.zeros_like(values[0], dtype=np.float32)  # Scheduler.swift weightedSum: scalars.initialize(repeating: 0.0)
        for w, v in zip(weights, values):
            out = (out + F(w) * v).astype(np.float32)  # cblas_saxpy with Float(weights[i])
        return out

    def first_order_update(self, model_output, timestep: int, prev_timestep: int, sample) -> np.ndarray:
        p_lambda_t, lambda_s = float(self.lambda_t[prev_timestep]), float(self.lambda_t[timestep])  # firstOrderUpdate
        p_alpha_t = float(self.alpha_t[prev_timestep])
        p_sigma_t, sigma_s = float(self.sigma_t[prev_timestep]), float(self.sigma_t[timestep])
        h = p_lambda_t - lambda_s
        return self.weighted_sum([p_sigma_t / sigma_s, -p_alpha_t * (math.exp(-h) - 1)], [sample, model_output])

    def step(self, output: np.ndarray, t: int, sample: np.ndarray, fused: bool = False) -> np.ndarray:
        step_index = self.time_steps.index(t) if t in self.time_steps else len(self.time_steps) - 1  # step(output:timeStep:sample:)
        prev_timestep = 0 if step_index == len(self.time_steps) - 1 else self.time_steps[step_index + 1]
        lower_order_final = step_index == len(self.time_steps) - 1 and len(self.time_steps) < 15
        lower_order_second = step_index == len(self.time_steps) - 2 and len(self.time_steps) < 15
        lower_order = self.lower_order_stepped < 1 or lower_order_final or lower_order_second
        model_output = self.convert_model_output(output, t, sample, fused)
        if len(self.model_outputs) == self.solver_order:
            self.model_outputs.pop(0)  # modelOutputs.removeFirst()
        self.model_outputs.append(model_output)
        if not lower_order:
            raise NotImplementedError("secondOrderUpdate: not needed at stepCount 1")
        prev_sample = self.first_order_update(model_output, t, prev_timestep, sample)
        if self.lower_order_stepped < self.solver_order:
            self.lower_order_stepped += 1
        return prev_sample


# ---------------------------------------------------------------------------------------------------
# pipeline/Unet.swift, pipeline/Decoder.swift, pipeline/CGImage+vImage.swift


def predict_noise(unet, latents: np.ndarray, time_step: int, hidden_states: np.ndarray) -> np.ndarray:
    t = np.full((hidden_states.shape[0],), F(time_step), dtype=np.float32)  # predictNoise: [Float(timeStep)] (×2 for a batch of 2)
    out = unet({"sample": latents, "timestep": t, "encoder_hidden_states": hidden_states})
    first = next(iter(out.values()))  # result.featureNames.first!: the first output, by position
    return np.asarray(first, dtype=np.float32)  # MLMultiArray(concatenating:…, dataType: .float32)


def decode(decoder, latents: list[np.ndarray], scale_factor: float = 0.18215, shift_factor: float = 0.0) -> list[np.ndarray]:
    images = []
    for sample in latents:  # Decoder.decode(_:scaleFactor:shiftFactor:)
        scaled = (sample / F(scale_factor) + F(shift_factor)).astype(np.float32)  # $0 / scaleFactor + shiftFactor
        out = decoder({"z": scaled})  # [inputName: …]: the decoder's one input, "z" in Apple's converter
        images.append(cgimage_from_shaped_array(np.asarray(next(iter(out.values())), dtype=np.float32)))
    return images


def cgimage_from_shaped_array(array: np.ndarray) -> np.ndarray:
    """CGImage.fromShapedArray → the (H, W, 3) uint8 pixels of the RGB CGImage."""
    assert array.shape[1] == 3  # guard channelCount == 3
    channels = [((array[0, i] + F(1.0)) * F(0.5) + F(0.0)).astype(np.float32) for i in range(3)]  # multiply(by: 0.5, preBias: 1.0, postBias: 0.0)
    interleaved = np.stack(channels, axis=-1)  # PixelBufferIFx3(planarBuffers:)
    # floatImage.convert(to: uint8Image): "[0.0, 1.0] → [0, 255], clamping" (vImage PixelBuffer convert(to:)),
    # to the nearest level (vImage's PlanarF → Planar8 rounding; ties have measure zero for model output)
    return np.floor(np.clip(interleaved, 0.0, 1.0).astype(np.float64) * 255.0 + 0.5).astype(np.uint8)


def planar_rgb_shaped_array(pixels: np.ndarray, min_value: float, max_value: float) -> np.ndarray:
    """CGImage.planarRGBShapedArray(minValue:maxValue:) of an opaque RGB image, (H, W, 3) uint8 →
    (1, 3, H, W) float32: ARGB8888 (alpha 255, so the alpha-0 → −1 rule never fires) through
    vImageConvert_ARGB8888toPlanarF, float = min + (max − min)·pixel/255, planes R, G, B."""
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
    lo, hi = F(min_value), F(max_value)
    planes = [(lo + (hi - lo) * (pixels[:, :, c].astype(np.float32) / F(255))).astype(np.float32) for c in range(3)]
    return np.stack(planes)[None]  # MLShapedArray(data: red + green + blue, shape: [1, 3, height, width])


def encode(encoder, pixels: np.ndarray, scale_factor: float, random: "TorchRandomSource", input_shape: tuple) -> np.ndarray:
    """Encoder.swift: encode(_:scaleFactor:random:) → the scaled latent (1, 4, h, w)."""
    image_data = planar_rgb_shaped_array(pixels, -1.0, 1.0)  # image.planarRGBShapedArray(minValue: -1.0, maxValue: 1.0)
    if tuple(image_data.shape) != tuple(input_shape):  # guard imageData.shape == inputShape
        raise ValueError("sampleInputShapeNotCorrect")
    out = encoder({"x": image_data})  # [inputName: MLMultiArray(imageData)]
    output = np.asarray(next(iter(out.values())), dtype=np.float32)  # result.featureNames.first!
    mean = output[0][0:4]  # output[0][0..<4]
    logvar = np.clip(output[0][4:8], F(-30), F(20)).astype(np.float32)  # min(max($0, -30), 20)
    std = np.exp(F(0.5) * logvar).astype(np.float32)  # exp(0.5 * $0)
    latent = np.empty_like(mean)
    flat_mean, flat_std, flat = mean.reshape(-1), std.reshape(-1), latent.reshape(-1)
    for i in range(flat.size):  # zip(mean.scalars, std.scalars).map { Float32(random.nextNormal(mean:stdev:)) }, in order
        flat[i] = F(random.next_normal(float(flat_mean[i]), float(flat_std[i])))
    return (latent * F(scale_factor)).astype(np.float32)[None]  # $0 * scaleFactor, shape [1] + latent.shape


# ---------------------------------------------------------------------------------------------------
# pipeline/StableDiffusionPipeline.swift: generateImages, text to image or image to image, DPM-Solver++


def generate_images(text_encoder, unet, decoder, tokenizer: BPETokenizer, prompt: str, *, seed: int, step_count: int = 1,
                    guidance_scale: float = 0.0, negative_prompt: str = "", decoder_scale_factor: float = 0.18215,
                    latent_shape: tuple | None = None, latents: np.ndarray | None = None, fused: bool = False,
                    encoder=None, starting_image: np.ndarray | None = None, strength: float = 1.0,
                    encoder_scale_factor: float = 0.18215) -> dict:
    """One image, ``imageCount`` 1, ``--scheduler dpmpp --rng torch``; image to image when
    ``starting_image`` ((H, W, 3) uint8) is given with ``strength`` < 1. Returns the pixels and what led to them."""
    image_to_image = starting_image is not None and strength < 1.0  # Configuration.mode: .imageToImage
    prompt_embedding = text_encoder_encode(text_encoder, tokenizer, prompt)  # textEncoder.encode(config.prompt)
    if guidance_scale >= 1.0:  # concatenate [negative, prompt]
        negative = text_encoder_encode(text_encoder, tokenizer, negative_prompt)
        prompt_embedding = np.concatenate([negative, prompt_embedding], axis=0)
    hidden_states = to_hidden_states(prompt_embedding)  # useMultilingualTextEncoder ? … : toHiddenStates(promptEmbedding)
    scheduler = DPMSolverMultistepScheduler(step_count=step_count)  # .dpmSolverMultistepScheduler (linspace spacing)
    if latents is None:  # generateLatentSamples: sampleShape[0] = 1, stdev = initNoiseSigma
        random = TorchRandomSource(seed)
        latents = random.normal_shaped_array(latent_shape, 0.0, float(scheduler.init_noise_sigma)).astype(np.float32)  # MLShapedArray<Float32>(converting:)
        if image_to_image:  # if let image = config.startingImage, config.mode == .imageToImage
            if encoder is None:
                raise ValueError("startingImageProvidedWithoutEncoder")
            image_shape = (1, 3, starting_image.shape[0], starting_image.shape[1])
            latent = encode(encoder, starting_image, encoder_scale_factor, random, image_shape)  # the same random, after the noise
            latents = scheduler.add_noise(latent, [latents], strength)[0]  # scheduler.addNoise(originalSample:noise:strength:)
    noise0 = latents.copy()
    denoised = latents.copy()
    time_steps = scheduler.calculate_timesteps(strength if image_to_image else None)  # timestepStrength
    for t in time_steps:  # for (step, t) in timeSteps.enumerated()
        if guidance_scale >= 1.0:  # a batch-1 Unet: serial predictions, uncond then text
            noise = np.concatenate([predict_noise(unet, latents, t, hidden_states[0:1]),
                                    predict_noise(unet, latents, t, hidden_states[1:2])], axis=0)
            noise = perform_guidance(noise, guidance_scale)
        else:
            noise = predict_noise(unet, latents, t, hidden_states)
        latents = scheduler.step(noise, t, latents, fused=fused)  # scheduler[i].step(output:timeStep:sample:)
        denoised = scheduler.model_outputs[-1]  # denoisedLatents[i] = scheduler[i].modelOutputs.last ?? latents[i]
    image = decode(decoder, [denoised], decoder_scale_factor)[0]  # decodeToImages(denoisedLatents, …)
    return {"image": image, "ids": text_encoder_ids(tokenizer, prompt), "noise": noise0, "x0": denoised,
            "timesteps": list(time_steps), "alpha": scheduler.alpha_t[time_steps[0]],
            "sigma": scheduler.sigma_t[time_steps[0]]}


# ---------------------------------------------------------------------------------------------------
# Apple's contract for the three packages, as data.
#
# Names, shapes and output dtypes as python_coreml_stable_diffusion/torch2coreml.py (at APPLE_COMMIT)
# emits them: convert_text_encoder (input "input_ids", float32 ids per coremltools#1423; outputs
# ["last_hidden_state", "pooled_outputs"]), convert_unet (inputs sample / timestep /
# encoder_hidden_states of shape (B, C, 1, S); output ["noise_pred"]), convert_vae_decoder (input "z",
# output ["image"]); every output TensorType(dtype=np.float32) in _convert_to_coreml. Input dtypes: what the
# Swift code accepts. It hands Float32 MLMultiArrays (TextEncoder.encode(ids:), Unet.predictNoise,
# Decoder.decode); torch2coreml declares the Unet's and the decoder's inputs float16 (their sample inputs
# are cast .astype(np.float16) / torch.float16 before _get_coreml_inputs), which Core ML converts to, so
# both are accepted there. Outputs must be FLOAT32: the Swift code converts them with
# MLShapedArray<Float32>(converting:), which fails on Float16 (apple/ml-stable-diffusion#253).
# Cardinality matters too: TextEncoder.inputDescription and Decoder.inputName take the first (only) input;
# Unet.predictNoise and Decoder.decode read result.featureNames.first! (a set: one output only).
# Dims: B batch (1 here; 2 for a classifier-free-guidance batch), S = 77 tokens, C text hidden size,
# h × w latent size, H × W image size.

_F32 = frozenset({"FLOAT32"})
_F16_OR_F32 = frozenset({"FLOAT16", "FLOAT32"})
CONTRACT = {
    "TextEncoder": {
        "inputs": [("input_ids", ("B", "S"), _F32)],
        "outputs": [("last_hidden_state", ("B", "S", "C"), _F32), ("pooled_outputs", ("B", "C"), _F32)],
    },
    "Unet": {
        "inputs": [("sample", ("B", 4, "h", "w"), _F16_OR_F32), ("timestep", ("B",), _F16_OR_F32),
                   ("encoder_hidden_states", ("B", "C", 1, "S"), _F16_OR_F32)],
        "outputs": [("noise_pred", ("B", 4, "h", "w"), _F32)],
    },
    "VAEDecoder": {
        "inputs": [("z", ("B", 4, "h", "w"), _F16_OR_F32)],
        "outputs": [("image", ("B", 3, "H", "W"), _F32)],
    },
    # convert_vae_encoder: input "x" (the image in [-1, 1]), output ["latent"] = quant_conv(encoder(x)), the
    # posterior's mean and logvar (Encoder.swift reads channels 0..<4 and 4..<8)
    "VAEEncoder": {
        "inputs": [("x", ("B", 3, "H", "W"), _F16_OR_F32)],
        "outputs": [("latent", ("B", 8, "h", "w"), _F32)],
    },
}
# StableDiffusionPipeline+Resources.swift, ResourceURLs(resourcesAt:): the files it loads (compiled .mlmodelc
# of these packages, `xcrun coremlcompiler compile X.mlpackage DIR`) and the tokenizer files
RESOURCES = ("TextEncoder.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc", "vocab.json", "merges.txt")


def resolve(dims: tuple, sizes: dict) -> list[int]:
    return [d if isinstance(d, int) else sizes[d] for d in dims]
