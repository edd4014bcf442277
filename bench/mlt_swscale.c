/*
 * What one source picture costs MLT 7.12's pixel path, per output frame, against FFmpeg's
 * filter graph: the swscale calls each makes for a 640x360 VP8 source shown in a 636x356 grid
 * cell of a 1280x720 canvas. MLT creates a context per call with the flags of its
 * mlt_get_sws_flags() and filter_swscale.c; ffmpeg's scale filter keeps one context and
 * scales each source picture once, in 4:2:0.
 *
 *   cc -O2 bench/mlt_swscale.c -o /tmp/mlt_swscale $(pkg-config --cflags --libs libswscale libavutil)
 *   /tmp/mlt_swscale
 *
 * Needs libswscale-dev and libavutil-dev (Debian).
 */
#include <libavutil/imgutils.h>
#include <libswscale/swscale.h>
#include <stdio.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Milliseconds per call: a new context for each call when per_call, else one for all. */
static double measure(int w, int h, int src_format, int out_w, int out_h, int dst_format,
                      int flags, int per_call)
{
    uint8_t *src[4], *dst[4];
    int src_stride[4], dst_stride[4];
    const int calls = 300;
    struct SwsContext *context = NULL;
    av_image_alloc(src, src_stride, w, h, src_format, 64);
    av_image_alloc(dst, dst_stride, out_w, out_h, dst_format, 64);
    double start = now();
    for (int i = 0; i < calls; i++) {
        if (!context || per_call) {
            sws_freeContext(context);
            context = sws_getContext(w, h, src_format, out_w, out_h, dst_format, flags,
                                     NULL, NULL, NULL);
        }
        sws_scale(context, (const uint8_t *const *)src, src_stride, 0, h, dst, dst_stride);
    }
    double ms = (now() - start) / calls * 1e3;
    sws_freeContext(context);
    av_freep(&src[0]);
    av_freep(&dst[0]);
    return ms;
}

int main(void)
{
    const int quality = SWS_FULL_CHR_H_INP | SWS_FULL_CHR_H_INT | SWS_ACCURATE_RND;
    const struct { const char *name; int flags; } rescale[] = {
        {"nearest", SWS_POINT}, {"fast_bilinear", SWS_FAST_BILINEAR},
        {"bilinear (default)", SWS_BILINEAR}, {"bicubic", SWS_BICUBIC},
    };
    printf("MLT, per source and output frame:\n");
    printf("  decode 4:2:0 -> packed 4:2:2, 640x360 (BILINEAR|ACCURATE_RND): %.3f ms\n",
           measure(640, 360, AV_PIX_FMT_YUV420P, 640, 360, AV_PIX_FMT_YUYV422,
                   SWS_BILINEAR | SWS_ACCURATE_RND, 1));
    for (unsigned i = 0; i < sizeof rescale / sizeof rescale[0]; i++)
        printf("  rescale 640x360 -> 636x358 packed 4:2:2, %-18s: %.3f ms\n", rescale[i].name,
               measure(640, 360, AV_PIX_FMT_YUYV422, 636, 358, AV_PIX_FMT_YUYV422,
                       rescale[i].flags | quality, 1));
    printf("MLT, per output frame: canvas 1280x720 packed 4:2:2 -> 4:2:0 for the encoder: %.3f ms\n",
           measure(1280, 720, AV_PIX_FMT_YUYV422, 1280, 720, AV_PIX_FMT_YUV420P,
                   SWS_BILINEAR | SWS_ACCURATE_RND, 1));
    printf("ffmpeg, per source picture (15 fps): 640x360 -> 636x358 4:2:0 bilinear: %.3f ms\n",
           measure(640, 360, AV_PIX_FMT_YUV420P, 636, 358, AV_PIX_FMT_YUV420P, SWS_BILINEAR, 0));
    return 0;
}
