// Portable scalar kernels: the definition every SIMD kernel must match bit for bit, and the
// path used on CPUs without AVX2 (and on ARM until a NEON kernel exists).
#include <cmath>

#include "kernels.h"

namespace bitnet158 {

float quantize_row_scalar(const float* x, int64_t k, int8_t* q) {
    float amax = 0.0f;
    bool has_nan = false;
    for (int64_t i = 0; i < k; ++i) {
        const float a = std::fabs(x[i]);
        amax = a > amax ? a : amax;  // NaN compares false: ignored, as by the SIMD max
        has_nan |= a != a;
    }
    const float s = row_scale(amax, has_nan);
    for (int64_t i = 0; i < k; ++i)
        q[i] = quantize_value(x[i] * s);
    return s;
}

// Dot product of one row r of a group with one activation row, over all K blocks:
// byte m of the row's 64 bytes in block b holds codes of k = 256*b + 64*j + m at shift 2*j.
static int32_t row_dot_codes(const uint8_t* group, int64_t nblocks, int r, const int8_t* x) {
    int32_t acc = 0;
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock + 64 * r;
        const int8_t* xb = x + b * kBlock;
        for (int m = 0; m < 64; ++m) {
            // |code * x| <= 256: 16-bit products and sums (|sum| <= 1024) vectorize well
            const uint8_t byte = w[m];
            const int16_t sum =
                static_cast<int16_t>(int16_t(byte & 3) * int16_t(xb[m]) +
                                     int16_t((byte >> 2) & 3) * int16_t(xb[64 + m]) +
                                     int16_t((byte >> 4) & 3) * int16_t(xb[128 + m]) +
                                     int16_t(byte >> 6) * int16_t(xb[192 + m]));
            acc += sum;
        }
    }
    return acc;
}

void gemm_groups_scalar(const int8_t* x_q, const int32_t* x_sum, int64_t T, int64_t kpad,
                        const uint8_t* packed, int64_t n, int64_t g0, int64_t g1,
                        const GemmOut& out) {
    const int64_t nblocks = kpad / kBlock;
    for (int64_t g = g0; g < g1; ++g) {
        const uint8_t* group = packed + g * kpad;
        for (int r = 0; r < kRows && g * kRows + r < n; ++r) {
            for (int64_t t = 0; t < T; ++t) {
                const int32_t dot = row_dot_codes(group, nblocks, r, x_q + t * kpad);
                out.store(t, g * kRows + r, dot - x_sum[t]);  // sum x*(w+1) - sum x
            }
        }
    }
}

// Dot product with 16 partial sums, the order the SIMD kernels use.
static float dot16(const float* a, const void* b, Dtype bt, int64_t off, int64_t n) {
    float acc[16] = {};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; ++l)
            acc[l] += a[i + l] * load_float(b, bt, off + i + l);
    for (int l = 0; i + l < n; ++l)
        acc[l] += a[i + l] * load_float(b, bt, off + i + l);
    float s = 0.0f;
    for (float v : acc)
        s += v;
    return s;
}

void attend_position_scalar(const float* q, int64_t group, const void* keys, const void* values,
                            Dtype kv, int64_t n, int64_t d, float scale, float* scores, float* out) {
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * n;
        float m = -__builtin_inff();
        for (int64_t j = 0; j < n; ++j) {
            float dot = 0.0f;  // in order over the dimensions, as the SIMD lanes (unfused)
            for (int64_t i = 0; i < d; ++i)
                dot += q[g * d + i] * load_float(keys, kv, key_index(j, i, d));
            sg[j] = dot * scale;
            m = sg[j] > m ? sg[j] : m;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            sg[j] = std::exp(sg[j] - m);
            sum += sg[j];
        }
        float* o = out + g * d;
        for (int64_t i = 0; i < d; ++i)
            o[i] = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            const float p = sg[j] / sum;
            for (int64_t i = 0; i < d; ++i)
                o[i] += p * load_float(values, kv, j * d + i);
        }
    }
}

void attend_scalar(const float* q, int64_t ldq, int64_t npos, int64_t group, const void* keys,
                   const void* values, Dtype kv, int64_t n0, int64_t d, float scale, float* scores,
                   float* out, int64_t ldo) {
    for (int64_t i = 0; i < npos; ++i)
        attend_position_scalar(q + i * ldq, group, keys, values, kv, n0 + i, d, scale, scores,
                               out + i * ldo);
}

void float_rows_scalar(const float* h, int64_t T, int64_t k, const void* w, Dtype wt, int64_t r0,
                       int64_t r1, float* out, int64_t ldo) {
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t t = 0; t < T; ++t)
            out[t * ldo + r] = dot16(h + t * k, w, wt, r * k, k);
}

void int8_rows_scalar(const int8_t* x_q, int64_t T, int64_t kpad, const int8_t* w,
                      const int32_t* w_sum, int64_t r0, int64_t r1, int32_t* out, int64_t ldo) {
    (void)w_sum;
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t* wr = w + r * kpad;
        for (int64_t t = 0; t < T; ++t) {
            const int8_t* x = x_q + t * kpad;
            int32_t acc = 0;
            for (int64_t i = 0; i < kpad; ++i)
                acc += int32_t(x[i]) * int32_t(wr[i]);
            out[t * ldo + r] = acc;
        }
    }
}

void silu_mul_scalar(float* g, const float* u, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        g[i] = (g[i] / (1.0f + std::exp(-g[i]))) * u[i];
}

void half_row_scalar(const float* x, int64_t n, uint16_t* out) {
    for (int64_t i = 0; i < n; ++i)
        out[i] = float_to_half(x[i]);
}

void q4_rows_scalar(const int8_t* x_q, const int32_t* x_corr, const float* inv_s, int64_t T,
                    int64_t kpad, const uint8_t* w, const uint16_t* d, int64_t r0, int64_t r1,
                    float* out, int64_t ldo) {
    (void)x_corr;
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* wr = w + r * (kpad / 2);
        const uint16_t* dr = d + r * (kpad / 32);
        for (int64_t t = 0; t < T; ++t) {
            const int8_t* x = x_q + t * kpad;
            float acc = 0.0f;
            for (int64_t blk = 0; blk < kpad / kQ4Block; ++blk) {
                const uint8_t* b = wr + kQ4Block / 2 * blk;
                int32_t dot[8] = {};
                for (int p = 0; p < kQ4Block; ++p) {  // step s = p / 64: byte 64 (s / 2) + p % 64
                    const int s = p / 64;
                    const int q = ((b[64 * (s / 2) + p % 64] >> (4 * (s % 2))) & 15) - 8;
                    dot[q4_natural(p) / 32] += q * x[kQ4Block * blk + p];
                }
                for (int g = 0; g < 8; ++g)
                    acc += half_to_float(dr[8 * blk + g]) * static_cast<float>(dot[g]);
            }
            out[t * ldo + r] = acc * inv_s[t];
        }
    }
}

}  // namespace bitnet158
