"""Images x checkpoints explanation grids (the paper's Fig. 6 and 7). Examples:

    python figures.py vgg.ckpt resnet.ckpt vit.ckpt --labels VGG-16 ResNet-50 ViT-B-16 \
        --images cat.jpg barometer.jpg --output fig6.png
    python figures.py r18.ckpt mnv3.ckpt --labels ResNet-18 MobileNetV3 --generated 4 \
        --upsampling nearest --output fig7.png
"""

from ptame.pipelines.figures import main

if __name__ == "__main__":
    main()
