"""Draw what the SD script trains on for a non-square photo: diffusers' squashed square against the default
aspect-preserving crops. Writes docs/views_squash_vs_crops.png (the README shows it).

    python tools/make_views_figure.py --output docs/views_squash_vs_crops.png
"""

import argparse
import os
import sys

from PIL import Image, ImageDraw, ImageFont


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dti_data  # noqa: E402


def example_photo(width=600, height=400):
    """A landscape 3:2 'photo' of a round toy ball and a box: a circle shows any squash at a glance."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):  # wall, then table
        shade = 225 - y // 6 if y < height * 0.62 else 150 - (y - height) // 8
        draw.line(
            [(0, y), (width, y)],
            fill=(shade, shade - 12, shade - 30) if y >= height * 0.62 else (shade - 20, shade - 10, shade),
        )
    cx, cy, r = 250, 220, 110
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 70, 60), outline=(90, 20, 20), width=4)
    draw.ellipse([cx - r, cy - 18, cx + r, cy + 18], fill=(245, 215, 80))  # a stripe round the ball
    draw.rectangle([400, 190, 500, 290], fill=(70, 120, 200), outline=(20, 40, 90), width=4)
    return image


def figure(photo, resolution=512, positions=8, tile=128):
    font = ImageFont.load_default(size=18)
    squashed = dti_data.square_view(photo, resolution)
    resized = dti_data.resized_shorter_side(photo, resolution)
    corners = dti_data.crop_positions(resized, resolution, center_crop=False, positions=positions)
    crops = [resized.crop((left, top, left + resolution, top + resolution)) for top, left in corners]
    pad, label = 16, 30
    width = pad + len(crops) * (tile + 8) + pad
    thumb = photo.resize((round(photo.width * 2 * tile / photo.height), 2 * tile))
    canvas = Image.new("RGB", (width, pad + label + 2 * tile + pad + label + tile + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), f"photo {photo.width}x{photo.height}", fill="black", font=font)
    canvas.paste(thumb, (pad, pad + label))
    x = pad + thumb.width + 40
    draw.text((x, pad), "--resize_mode squash (diffusers): the ball is squashed", fill="black", font=font)
    canvas.paste(squashed.resize((2 * tile, 2 * tile)), (x, pad + label))
    y = pad + label + 2 * tile + pad
    draw.text(
        (pad, y),
        f"default: shorter side to {resolution}, {positions} square crops along the longer side (one drawn per "
        "sample); aspect kept",
        fill="black",
        font=font,
    )
    for i, crop in enumerate(crops):
        canvas.paste(crop.resize((tile, tile)), (pad + i * (tile + 8), y + label))
    return canvas


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="docs/views_squash_vs_crops.png")
    parser.add_argument("--image", default=None, help="A photo of your own instead of the drawn example.")
    args = parser.parse_args()
    photo = Image.open(args.image).convert("RGB") if args.image else example_photo()
    figure(photo).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
