/* edged's compiled resampler: the bilinear resampling of edged/stages/vision/preprocess.py
 * (_Plan.resample), in the same integer arithmetic, and the model input's lookup table applied
 * to its result in the same pass.
 *
 * Plain C99 with no Python header: setup.py builds it as an optional extension and
 * edged/stages/vision/native.py loads it with ctypes. The numpy code stays the reference (and the
 * fallback when this file could not be built); tests/test_resample.py checks that both give the
 * same bytes.
 *
 * The arithmetic, for one output value (channel c of output pixel (r, k)):
 *   down the columns, with the bottom row's weight wy in 1/256 (0..256):
 *       L = 256 * top[x0] + (bottom[x0] - top[x0]) * wy      (0 .. 255 * 256)
 *       R = 256 * top[x1] + (bottom[x1] - top[x1]) * wy
 *   then along the row, with the right pixel's weight wx in 1/65536 (0..65536):
 *       o = 65536 * L + (R - L) * wx + 2^23                   (below 2^32)
 *   and the value is o's top byte. Every intermediate is exact (the numpy code computes the same
 *   values in wrapping uint16 and uint32, which are exact because the results lie in range), so
 *   the order of the sums does not matter and the bytes are the same.
 *
 * The source is any 8-bit RGB array given by its first pixel and three strides in bytes (rows,
 * pixels, channels), negative ones included: a region of a frame, or a frame turned by
 * numpy.rot90, is read where it lies, without a copy. */

#include <stddef.h>
#include <stdint.h>

#include <string.h>

/* On x86-64 the loops below are also built for AVX2 and the loader picks that build on a CPU that
 * has it (glibc's ifunc): SSE2, the x86-64 baseline, has no 32-bit multiply, which the blend along
 * the rows needs per value. Integer arithmetic only: every build gives the same bytes. aarch64's
 * baseline (NEON) has it, and one build serves. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define WIDE __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef WIDE
#define WIDE
#endif

/* taps: one int32 array per plan, six runs one after the other:
 *   y0[out_h] y1[out_h] wy[out_h]   source rows above and below each output row, bottom weight
 *   x0[out_w] x1[out_w]             source pixels left and right of each output pixel
 *   wx[3 * out_w]                   the right pixel's weight, per value (the same for the three
 *                                   channels of a pixel) */

/* A one-byte table that maps the three channels alike and is the pixel value plus a constant, plus
 * at most three steps up from given pixel values on (mod 256): what a quantised uint8 input's
 * table is (scale close to one code per level, as for p, p - 128, p + (p >= 128)). Applied with
 * compares and adds, which the compiler vectorises, instead of a lookup per value. */
typedef struct {
    int ok;
    uint8_t base, at[3], step[3];
} steps_t;

static steps_t find_steps(const uint8_t *t)
{
    steps_t s;
    int i, n = 0;
    uint8_t prev;

    memset(&s, 0, sizeof s);
    for (i = 0; i < 256; i++)
        if (t[256 + i] != t[i] || t[512 + i] != t[i])
            return s;
    s.base = prev = t[0];
    for (i = 1; i < 256; i++) {
        const uint8_t d = (uint8_t)(t[i] - i);
        if (d != prev) {
            if (n == 3)
                return s;
            s.at[n] = (uint8_t)i;
            s.step[n++] = (uint8_t)(d - prev);
            prev = d;
        }
    }
    s.ok = 1;  /* unused steps: from 0 on, by 0 */
    return s;
}

static steps_t no_steps(void)
{
    steps_t s;

    memset(&s, 0, sizeof s);
    return s;
}

static void map_row(const uint8_t *pix, int n, const void *lut, int item, const steps_t *steps, uint8_t *dst)
{
    /* pix holds n values, channel-last (value k is channel k % 3); the table has 256 entries per
     * channel, channel-major, each `item` bytes wide. Copies by width so the compiler moves whole
     * words (float32 tables are moved as their 4 bytes). */
    int k;
    switch (item) {
    case 1: {
        const uint8_t *t = (const uint8_t *)lut;
        if (steps->ok) {
            /* t[p] = p + base + the steps at or below p, exactly, by find_steps' construction */
            const uint8_t base = steps->base, a0 = steps->at[0], a1 = steps->at[1], a2 = steps->at[2];
            const uint8_t s0 = steps->step[0], s1 = steps->step[1], s2 = steps->step[2];
            for (k = 0; k < n; k++) {
                const uint8_t p = pix[k];
                dst[k] = (uint8_t)(p + base + (p >= a0 ? s0 : 0) + (p >= a1 ? s1 : 0) + (p >= a2 ? s2 : 0));
            }
            break;
        }
        for (k = 0; k + 3 <= n; k += 3) {
            dst[k] = t[pix[k]];
            dst[k + 1] = t[256 + pix[k + 1]];
            dst[k + 2] = t[512 + pix[k + 2]];
        }
        break;
    }
    case 2: {
        const uint16_t *t = (const uint16_t *)lut;
        uint16_t *d = (uint16_t *)dst;
        for (k = 0; k + 3 <= n; k += 3) {
            d[k] = t[pix[k]];
            d[k + 1] = t[256 + pix[k + 1]];
            d[k + 2] = t[512 + pix[k + 2]];
        }
        break;
    }
    case 4: {
        const uint32_t *t = (const uint32_t *)lut;
        uint32_t *d = (uint32_t *)dst;
        for (k = 0; k + 3 <= n; k += 3) {
            d[k] = t[pix[k]];
            d[k + 1] = t[256 + pix[k + 1]];
            d[k + 2] = t[512 + pix[k + 2]];
        }
        break;
    }
    default: {  /* 8 */
        const uint64_t *t = (const uint64_t *)lut;
        uint64_t *d = (uint64_t *)dst;
        for (k = 0; k + 3 <= n; k += 3) {
            d[k] = t[pix[k]];
            d[k + 1] = t[256 + pix[k + 1]];
            d[k + 2] = t[512 + pix[k + 2]];
        }
        break;
    }
    }
}

static int item_ok(int item)
{
    return item == 1 || item == 2 || item == 4 || item == 8;
}

/* Resample `src` (rows, pixels and channels `row_step`, `px_step`, `ch_step` bytes apart) to
 * out_h x out_w pixels written to `pixels` (rows `pixels_row` bytes apart, pixels packed). With a
 * table (`lut` not NULL), each value is also mapped through it into `dst` (rows `dst_row` bytes
 * apart, values packed, `item` bytes each). `work` holds 3 * src_w + 6 * out_w + 3 values.
 * Returns 0, or -1 for an item size it does not know. */
WIDE int edged_bilinear(const uint8_t *src, ptrdiff_t row_step, ptrdiff_t px_step, ptrdiff_t ch_step,
                   const int32_t *taps, int out_h, int out_w,
                   uint8_t *pixels, ptrdiff_t pixels_row,
                   const void *lut, int item, uint8_t *dst, ptrdiff_t dst_row, uint16_t *work)
{
    const int32_t *y0 = taps, *y1 = taps + out_h, *wys = taps + 2 * out_h;
    const int32_t *x0 = taps + 3 * out_h, *x1 = x0 + out_w, *wx = x0 + 2 * out_w;
    /* The source pixels any output pixel reads: the taps rise from left to right. */
    const int lo = x0[0], span = x1[out_w - 1] - lo + 1, n = 3 * out_w;
    const int packed = px_step == 3 && ch_step == 1;
    /* work: the row blended down the columns (3 values per source pixel, one spare), then the
     * left and right values of each output value (one spare each: a pixel's three values are
     * moved as four). */
    uint16_t *col = work, *left = col + 3 * span + 1, *right = left + n + 1;
    int r, k, j;

    steps_t steps;

    if (lut != NULL && !item_ok(item))
        return -1;
    steps = lut != NULL && item == 1 ? find_steps((const uint8_t *)lut) : no_steps();
    src += (ptrdiff_t)lo * px_step;
    col[3 * span] = 0;
    for (r = 0; r < out_h; r++) {
        const uint8_t *top = src + (ptrdiff_t)y0[r] * row_step;
        const uint8_t *bot = src + (ptrdiff_t)y1[r] * row_step;
        const int wy = wys[r];
        uint8_t *out = pixels + (ptrdiff_t)r * pixels_row;

        /* Down the columns: 256 * top + (bottom - top) * wy, each value exact in 16 bits. A packed
         * row is one run of values, which the compiler vectorises. */
        if (packed) {
            for (j = 0; j < 3 * span; j++)
                col[j] = (uint16_t)(top[j] * 256 + (bot[j] - top[j]) * wy);
        } else {
            for (j = 0; j < span; j++) {
                const uint8_t *t = top + (ptrdiff_t)j * px_step, *b = bot + (ptrdiff_t)j * px_step;
                col[3 * j] = (uint16_t)(t[0] * 256 + (b[0] - t[0]) * wy);
                col[3 * j + 1] = (uint16_t)(t[ch_step] * 256 + (b[ch_step] - t[ch_step]) * wy);
                col[3 * j + 2] = (uint16_t)(t[2 * ch_step] * 256 + (b[2 * ch_step] - t[2 * ch_step]) * wy);
            }
        }
        /* Along the row: each output value's two neighbours gathered (a pixel's values moved as
         * one 8-byte word), then 65536 * left + (right - left) * wx + 2^23 in uint32, whose top
         * byte is the value (below 2^32: exact); a run the compiler vectorises. */
        for (k = 0; k < out_w; k++) {
            memcpy(left + 3 * k, col + 3 * (x0[k] - lo), 8);
            memcpy(right + 3 * k, col + 3 * (x1[k] - lo), 8);
        }
        for (k = 0; k < n; k++)
            out[k] = (uint8_t)((((uint32_t)left[k] << 16) + (uint32_t)(right[k] - left[k]) * (uint32_t)wx[k]
                                + (1u << 23)) >> 24);
        if (lut != NULL)
            map_row(out, n, lut, item, &steps, dst + (ptrdiff_t)r * dst_row);
    }
    return 0;
}

/* The table alone: `src` (h x w pixels, strides as in edged_bilinear) mapped into `dst`. For a
 * frame already at the model's size, and for pixels another stage resampled. Returns 0 or -1. */
WIDE int edged_map(const uint8_t *src, ptrdiff_t row_step, ptrdiff_t px_step, ptrdiff_t ch_step,
              int h, int w, const void *lut, int item, uint8_t *dst, ptrdiff_t dst_row,
              uint8_t *row_buf)
{
    int r, k;

    steps_t steps;

    if (!item_ok(item))
        return -1;
    steps = item == 1 ? find_steps((const uint8_t *)lut) : no_steps();
    for (r = 0; r < h; r++) {
        const uint8_t *in = src + (ptrdiff_t)r * row_step;
        const uint8_t *row = in;

        if (px_step != 3 || ch_step != 1) {  /* gather the row packed first */
            for (k = 0; k < w; k++) {
                const uint8_t *p = in + (ptrdiff_t)k * px_step;
                row_buf[3 * k] = p[0];
                row_buf[3 * k + 1] = p[ch_step];
                row_buf[3 * k + 2] = p[2 * ch_step];
            }
            row = row_buf;
        }
        map_row(row, 3 * w, lut, item, &steps, dst + (ptrdiff_t)r * dst_row);
    }
    return 0;
}

/* One axis of a plan's taps, as preprocess._taps computes them in float64: output pixel k of
 * `dst` samples source position p = clip((k + 0.5) * (src / dst) - 0.5, 0, src - 1) (half-pixel
 * centres), between pixels i0 = floor(p) and i1 = min(i0 + 1, src - 1), the second weighted by
 * w = (float)(p - i0) in 1/`one` units: rint(w * one). Every step is one IEEE operation in the
 * same order as numpy's (setup.py builds with -ffp-contract=off, so no multiply-add is fused), the
 * truncation of a non-negative double is its floor, the float32 rounding is a cast, and w * one
 * is exact (`one` is a power of two); only the last rounding (half to even, as np.rint) is done by
 * hand, which keeps this file free of libm. */
static void axis_taps(int src, int dst, int32_t one, int32_t *i0s, int32_t *i1s, int32_t *ws, int ws_step)
{
    const double scale = (double)src / (double)dst, last = (double)(src - 1);
    int k, c;

    for (k = 0; k < dst; k++) {
        double p = ((double)k + 0.5) * scale;
        int32_t i0, r;
        float w;
        double x, frac;

        p = p - 0.5;
        if (p < 0.0)
            p = 0.0;
        if (p > last)
            p = last;
        i0 = (int32_t)p;
        w = (float)(p - (double)i0);
        x = (double)w * (double)one;
        r = (int32_t)x;
        frac = x - (double)r;
        if (frac > 0.5 || (frac == 0.5 && (r & 1)))
            r++;
        i0s[k] = i0;
        i1s[k] = i0 + 1 < src ? i0 + 1 : src - 1;
        for (c = 0; c < ws_step; c++)
            ws[ws_step * k + c] = r;
    }
}

/* A plan's taps (the runs edged_bilinear reads) for a src_h x src_w source resampled to
 * out_h x out_w: bilinear as above, or nearest (both taps on the source pixel whose span holds the
 * output pixel's centre, min((k + 0.5) * (src / dst), src - 1) truncated, and weights 0). `taps`
 * holds 3 * out_h + 5 * out_w values. */
void edged_taps(int src_h, int src_w, int out_h, int out_w, int bilinear, int32_t *taps)
{
    int32_t *y0 = taps, *y1 = taps + out_h, *wy = taps + 2 * out_h;
    int32_t *x0 = taps + 3 * out_h, *x1 = x0 + out_w, *wx = x0 + 2 * out_w;
    int k;

    if (bilinear) {
        axis_taps(src_h, out_h, 256, y0, y1, wy, 1);
        axis_taps(src_w, out_w, 65536, x0, x1, wx, 3);
        return;
    }
    for (k = 0; k < out_h; k++) {
        double p = ((double)k + 0.5) * ((double)src_h / (double)out_h);
        int32_t r = (int32_t)p;
        y0[k] = y1[k] = r < src_h - 1 ? r : src_h - 1;
        wy[k] = 0;
    }
    for (k = 0; k < out_w; k++) {
        double p = ((double)k + 0.5) * ((double)src_w / (double)out_w);
        int32_t r = (int32_t)p;
        x0[k] = x1[k] = r < src_w - 1 ? r : src_w - 1;
        wx[3 * k] = wx[3 * k + 1] = wx[3 * k + 2] = 0;
    }
}

/* The SSD decoder's candidates (edged/stages/vision/ssd.py), for int8 outputs: the stored score
 * codes of n anchors x c columns (the first `skip` columns background) at or above `bound`, in
 * row-major order, as numpy.nonzero finds them. For the first `cap` of them: the anchor, the class
 * (column - skip), its logit and the anchor's four box codes dequantised as numpy does it in
 * float32, ((float)code - (float)zero_point) * (float)scale, and the anchor's four values. One call
 * instead of a dozen numpy calls, each slow from caches an invoke has just emptied. Returns how
 * many there are (all of them, beyond `cap` too). */
int edged_ssd_candidates(const int8_t *scores, int n, int c, int skip, int bound,
                         float score_zero, float score_scale, const int8_t *boxes, float box_zero,
                         float box_scale, const float *anchors, int cap, int32_t *anchor_out,
                         int32_t *class_out, float *logit_out, float *box_out, float *anchor_vals)
{
    int a, j, found = 0;

    for (a = 0; a < n; a++) {
        const int8_t *row = scores + (ptrdiff_t)a * c;
        for (j = skip; j < c; j++) {
            if (row[j] < bound)
                continue;
            if (found < cap) {
                const int8_t *b = boxes + (ptrdiff_t)a * 4;
                int k;
                anchor_out[found] = a;
                class_out[found] = j - skip;
                logit_out[found] = ((float)row[j] - score_zero) * score_scale;
                for (k = 0; k < 4; k++) {
                    box_out[4 * found + k] = ((float)b[k] - box_zero) * box_scale;
                    anchor_vals[4 * found + k] = anchors[4 * (ptrdiff_t)a + k];
                }
            }
            found++;
        }
    }
    return found;
}

/* The BlazeFace decoder's candidates (edged/stages/vision/blazeface.py), for float32 outputs: the
 * anchors whose score is at or above `limit` (compared in float32, as numpy compares a float32
 * array with a Python float), in order. For the first `cap` of them: the anchor, its score, the
 * first four of its `box_step` regressors and its four anchor values. Returns how many there are. */
int edged_float_candidates(const float *scores, int n, float limit, const float *boxes, int box_step,
                           const float *anchors, int cap, int32_t *anchor_out, float *score_out,
                           float *box_out, float *anchor_vals)
{
    int a, k, found = 0;

    for (a = 0; a < n; a++) {
        if (!(scores[a] >= limit))
            continue;
        if (found < cap) {
            anchor_out[found] = a;
            score_out[found] = scores[a];
            for (k = 0; k < 4; k++) {
                box_out[4 * found + k] = boxes[(ptrdiff_t)a * box_step + k];
                anchor_vals[4 * found + k] = anchors[4 * (ptrdiff_t)a + k];
            }
        }
        found++;
    }
    return found;
}
