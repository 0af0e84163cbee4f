from trt_gemma.cli import main

main()
