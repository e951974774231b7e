"""Tiny GTSRB-format data sets for tests: class folders of .ppm images with ';' annotation CSVs."""
import os

from PIL import Image, ImageDraw

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def sign_image(class_id, variant, size=36):
    """A simple synthetic 'sign': the class decides colour and shape, the variant shifts it."""
    colors = [(200, 30, 30), (30, 60, 200), (240, 200, 20), (30, 160, 60), (120, 40, 160)]
    image = Image.new("RGB", (size, size), (90 + 10 * (variant % 5), 110, 100))
    draw = ImageDraw.Draw(image)
    margin = 5 + variant % 3
    box = (margin, margin, size - margin, size - margin)
    color = colors[class_id % len(colors)]
    if class_id % 2:
        draw.ellipse(box, fill=color, outline=(255, 255, 255), width=2)
    else:
        draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)], fill=color)
    draw.text((size // 2 - 3, size // 2 - 5), str(class_id % 10), fill=(255, 255, 255))
    return image


def make_tiny_gtsrb(root, classes=(0, 1, 2, 3), tracks=3, frames=4, test_images=12):
    """Writes ROOT/gtsrb/GTSRB/Training/000NN/{TTTTT_FFFFF.ppm, GT-000NN.csv} and a small test split."""
    training = os.path.join(root, "gtsrb", "GTSRB", "Training")
    for c in classes:
        folder = os.path.join(training, f"{c:05d}")
        os.makedirs(folder, exist_ok=True)
        lines = [HEADER]
        for t in range(tracks):
            for f in range(frames):
                name = f"{t:05d}_{f:05d}.ppm"
                sign_image(c, t * frames + f).save(os.path.join(folder, name))
                lines.append(f"{name};36;36;5;5;31;31;{c}\n")
        with open(os.path.join(folder, f"GT-{c:05d}.csv"), "w") as fh:
            fh.writelines(lines)
    images = os.path.join(root, "gtsrb", "GTSRB", "Final_Test", "Images")
    os.makedirs(images, exist_ok=True)
    lines = [HEADER]
    for i in range(test_images):
        c = classes[i % len(classes)]
        name = f"{i:05d}.ppm"
        sign_image(c, 100 + i).save(os.path.join(images, name))
        lines.append(f"{name};36;36;5;5;31;31;{c}\n")
    with open(os.path.join(root, "gtsrb", "GT-final_test.csv"), "w") as fh:
        fh.writelines(lines)
    return root
