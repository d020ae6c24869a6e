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

/* taps: one int32 array per plan, six runs one after the other:
 *   y0[out_h] y1[out_h] wy[out_h]   source rows above and below each output row, bottom weight
 *   x0[out_w] x1[out_w]             source pixels left and right of each output pixel
 *   wx[3 * out_w]                   the right pixel's weight, per value (the same for the three
 *                                   channels of a pixel) */

static void map_row(const uint8_t *pix, int n, const void *lut, int item, uint8_t *dst)
{
    /* pix holds n values, channel-last (value k is channel k % 3); the table has 256 entries per
     * channel, channel-major, each `item` bytes wide. Copies by width so the compiler moves whole
     * words (float32 tables are moved as their 4 bytes). */
    int k;
    switch (item) {
    case 1: {
        const uint8_t *t = (const uint8_t *)lut;
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
int edged_bilinear(const uint8_t *src, ptrdiff_t row_step, ptrdiff_t px_step, ptrdiff_t ch_step,
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

    if (lut != NULL && !item_ok(item))
        return -1;
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
            map_row(out, n, lut, item, dst + (ptrdiff_t)r * dst_row);
    }
    return 0;
}

/* The table alone: `src` (h x w pixels, strides as in edged_bilinear) mapped into `dst`. For a
 * frame already at the model's size, and for pixels another stage resampled. Returns 0 or -1. */
int edged_map(const uint8_t *src, ptrdiff_t row_step, ptrdiff_t px_step, ptrdiff_t ch_step,
              int h, int w, const void *lut, int item, uint8_t *dst, ptrdiff_t dst_row,
              uint8_t *row_buf)
{
    int r, k;

    if (!item_ok(item))
        return -1;
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
        map_row(row, 3 * w, lut, item, dst + (ptrdiff_t)r * dst_row);
    }
    return 0;
}
